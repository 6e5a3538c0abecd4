"""HF checkpoint IO: streaming sharded load, save_pretrained round trips, errors, Orbax conversion."""
import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from klong_jax.hf import load_config, load_from_reader, load_pretrained, save_pretrained
from klong_jax.model_checkpoint import load_model, save_model
from klong_jax.models import ModelConfig
from klong_jax.sharding import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FIXTURE = os.path.join(FIXTURES, "groups_noNorm_scaled")
LLAMA_TIED = os.path.join(FIXTURES, "llama_tied")
LLAMA_UNTIED = os.path.join(FIXTURES, "llama_untied_headdim")
HF_PYTHON = os.environ.get("KLONG_HF_PYTHON")  # a Python with torch + transformers (see .ci/run)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _copy_fixture(tmp_path, src=FIXTURE):
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def _logits_close(model, case_dir, atol=1e-4):
    ids = np.load(os.path.join(case_dir, "inputs.npy"))
    out = np.asarray(model(ids))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.load(os.path.join(case_dir, "logits.npy")), atol=atol, rtol=0)


def test_save_then_load_is_identical_and_shards(tmp_path):
    model = load_pretrained(FIXTURE)
    out = tmp_path / "saved"
    save_pretrained(model, str(out), max_shard_bytes=40_000)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(load_file(os.path.join(FIXTURE, "model.safetensors")))
    again = load_pretrained(str(out))
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bfloat16_save_keeps_router_fp32(tmp_path):
    save_pretrained(load_pretrained(FIXTURE), str(tmp_path / "bf16"), save_dtype="bfloat16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert str(tensors["model.layers.1.self_attn.q_proj.weight"].dtype) == "bfloat16"
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    model = load_pretrained(str(tmp_path / "bf16"), compute_dtype="float32")
    ids = np.load(os.path.join(FIXTURE, "inputs.npy"))
    ref = np.load(os.path.join(FIXTURE, "logits.npy"))
    assert np.abs(np.asarray(model(ids)) - ref).max() < 0.05


def test_shape_mismatch_names_the_tensor(tmp_path):
    d = _copy_fixture(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight has shape \(3, 3\)"):
        load_pretrained(str(d))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = _copy_fixture(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensors: \\['model.norm.weight'\\]"):
        load_pretrained(str(d))
    tensors["model.norm.weight"] = np.ones(32, np.float32)
    tensors["model.layers.1.mlp.surprise.weight"] = np.ones(3, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="surprise"):
        load_pretrained(str(d))


def test_config_mismatch_names_the_file_and_field(tmp_path):
    d = _copy_fixture(tmp_path)
    cfg = json.load(open(d / "config.json"))
    cfg["num_key_value_heads"] = 3
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="config.json.*num_key_value_heads"):
        load_pretrained(str(d))


def test_mtp_layer_is_skipped(tmp_path, caplog):
    d = _copy_fixture(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.3.eh_proj.weight"] = np.ones((32, 64), np.float32)  # layer index == num layers
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("INFO"):
        load_pretrained(str(d))
    assert "multi-token-prediction" in caplog.text


def test_streaming_load_reads_only_needed_slices(tmp_path):
    """Each device shard is filled from the HF tensors it covers: check shard contents directly."""
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    model = load_pretrained(FIXTURE, mesh=mesh)
    w = nnx.state(model)["moe_layers"]["mlp"]["w_gate"].get_value()
    assert w.sharding.spec[1] == "expert"
    ref = load_file(os.path.join(FIXTURE, "model.safetensors"))
    for shard in w.addressable_shards:
        l_sl, e_sl = shard.index[0], shard.index[1]
        for li, l in enumerate(range(*l_sl.indices(w.shape[0]))):
            for ei, e in enumerate(range(*e_sl.indices(w.shape[1]))):
                hf = ref[f"model.layers.{l + 1}.mlp.experts.{e}.gate_proj.weight"].T
                np.testing.assert_array_equal(np.asarray(shard.data[li, ei]), hf[shard.index[2:]])


def test_orbax_conversion_restores_onto_another_mesh(tmp_path):
    src = load_pretrained(FIXTURE, mesh=make_mesh({"fsdp": 2, "tensor": 4}))
    save_model(src, str(tmp_path / "orbax"))
    restored = load_model(str(tmp_path / "orbax"), make_mesh({"fsdp": 8}))
    a, b = _params(src), _params(restored)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert restored.cfg == src.cfg


class DictReader:
    """The tensor-source interface of load_from_reader over a dict of HF-layout arrays."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return self.tensors[key].shape

    def get(self, key):
        self.reads.append(key)
        return self.tensors[key]


def test_load_from_reader_takes_any_tensor_source():
    tensors = load_file(os.path.join(LLAMA_UNTIED, "model.safetensors"))
    reader = DictReader(tensors)
    cfg = load_config(LLAMA_UNTIED, compute_dtype="float32")
    model = load_from_reader(reader, cfg, source="in-memory dict")
    _logits_close(model, LLAMA_UNTIED)
    assert set(reader.reads) == set(tensors)       # every tensor read, nothing else asked for
    del tensors["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"in-memory dict: missing tensors: \['model.layers.2.mlp.up_proj.weight'\]"):
        load_from_reader(DictReader(tensors), cfg, source="in-memory dict")


def test_llama_config_reads_and_writes_llama_fields():
    cfg = load_config(LLAMA_TIED)
    hf = json.load(open(os.path.join(LLAMA_TIED, "config.json")))
    assert (cfg.model_type, cfg.tie_word_embeddings, cfg.rope_theta, cfg.partial_rotary_factor) == \
        ("llama", True, 1e5, 1.0)
    assert (cfg.first_k_dense_replace, cfg.num_moe_layers, cfg.attention_bias) == (2, 0, False)
    assert cfg.head_dim == 16 // 4 and "head_dim" in hf   # transformers writes the derived head_dim too
    del hf["head_dim"]                                     # ... which may be absent in older files
    assert ModelConfig.from_hf_dict(hf).head_dim == 4
    out = cfg.to_hf_dict()
    assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
    assert not {"n_routed_experts", "first_k_dense_replace", "use_qk_norm"} & set(out)
    assert {k: out[k] for k in hf if k not in ("transformers_version", "head_dim")} == \
        {k: hf[k] for k in hf if k != "transformers_version"}
    # transformers 4.x layout: rope_theta at the top level beside rope_scaling=null
    legacy = dict(hf, rope_theta=1e5, rope_scaling=None)
    del legacy["rope_parameters"]
    assert ModelConfig.from_hf_dict(legacy).rope_theta == 1e5


@pytest.mark.parametrize("field,value,match", [
    ("mlp_bias", True, "mlp_bias=True"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling=.*llama3"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e5}, "rope_parameters.rope_type='yarn'"),
    ("model_type", "mistral", "model_type='mistral'"),
    ("layer_types", ["full_attention", "sliding_attention"], r"layer_types has \[.sliding_attention.\]"),
])
def test_llama_config_errors_name_the_field(tmp_path, field, value, match):
    d = _copy_fixture(tmp_path, LLAMA_TIED)
    cfg = json.load(open(d / "config.json"))
    cfg[field] = value
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=f"config.json: .*{match}"):
        load_pretrained(str(d))


def test_tied_checkpoint_may_store_an_equal_lm_head(tmp_path):
    d = _copy_fixture(tmp_path, LLAMA_TIED)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(str(d), compute_dtype="float32")
    assert "lm_head" not in nnx.state(model)
    _logits_close(model, LLAMA_TIED)
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tie_word_embeddings=true but .* lm_head.weight that differs"):
        load_pretrained(str(d))


@pytest.mark.parametrize("case_dir", [LLAMA_TIED, LLAMA_UNTIED], ids=["tied", "untied"])
def test_llama_save_then_load_is_identical(tmp_path, case_dir):
    model = load_pretrained(case_dir, mesh=make_mesh({"fsdp": 2, "tensor": 4}))
    save_pretrained(model, str(tmp_path / "out"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(load_file(os.path.join(case_dir, "model.safetensors")))
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    a, b = _params(model), _params(load_pretrained(str(tmp_path / "out")))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_compute_and_param_dtypes_mean_one_thing_each(tmp_path):
    # fp32 compute asked for with a jnp dtype object: fp32 logits within 1e-4 of transformers' fp32 logits.
    model = load_pretrained(FIXTURE, compute_dtype=jnp.float32)
    assert (model.cfg.compute_dtype, model.cfg.param_dtype) == ("float32", "float32")
    _logits_close(model, FIXTURE)
    # bf16 compute (the default) is visibly further off: this is what a confused dtype= used to give.
    ids = np.load(os.path.join(FIXTURE, "inputs.npy"))
    bf16 = np.asarray(load_pretrained(FIXTURE)(ids))
    assert np.abs(bf16 - np.load(os.path.join(FIXTURE, "logits.npy"))).max() > 1e-3
    # bf16 storage, fp32 compute; the router stays fp32.
    stored = load_pretrained(FIXTURE, param_dtype=jnp.bfloat16, compute_dtype="float32")
    state = nnx.state(stored)
    assert stored.cfg.param_dtype == "bfloat16"
    assert state["moe_layers"]["mlp"]["w_gate"].get_value().dtype == jnp.bfloat16
    assert state["moe_layers"]["mlp"]["router"].get_value().dtype == jnp.float32
    # Config holding dtype objects saves (HF and Orbax) and says canonical names.
    save_pretrained(model, str(tmp_path / "hf"), save_dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "hf" / "config.json"))["dtype"] == "bfloat16"
    save_model(model, str(tmp_path / "orbax"))
    assert load_model(str(tmp_path / "orbax"), make_mesh({"fsdp": 8})).cfg.compute_dtype == "float32"


def test_dtype_fields_are_normalised_and_checked():
    cfg = ModelConfig(compute_dtype=jnp.bfloat16, param_dtype=np.float32)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert cfg == ModelConfig(compute_dtype="bfloat16", param_dtype="float32")
    with pytest.raises(ValueError, match="compute_dtype='int32' is not a floating dtype"):
        ModelConfig(compute_dtype="int32")
    with pytest.raises(ValueError, match="param_dtype='fp33' is not a dtype"):
        ModelConfig(param_dtype="fp33")


def test_ambiguous_dtype_argument_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="param_dtype= .*storage.* or compute_dtype="):
        load_pretrained(FIXTURE, dtype=jnp.float32)
    save_model(load_pretrained(LLAMA_TIED), str(tmp_path / "orbax"))
    with pytest.raises(TypeError, match="param_dtype= .*storage.* or compute_dtype="):
        load_model(str(tmp_path / "orbax"), make_mesh({"fsdp": 8}), dtype="float32")
    with pytest.raises(TypeError, match="dtype"):
        save_pretrained(load_pretrained(LLAMA_TIED), str(tmp_path / "hf"), dtype="bfloat16")


def test_orbax_checkpoint_with_the_old_dtype_key_still_loads(tmp_path):
    """Before the rename, model_config JSON held the compute dtype as "dtype"."""
    model = load_pretrained(LLAMA_TIED, compute_dtype="float32")
    save_model(model, str(tmp_path / "orbax"))
    meta_path = tmp_path / "orbax" / "0" / "model_config" / "metadata"
    meta = json.load(open(meta_path))
    meta["dtype"] = meta.pop("compute_dtype")
    json.dump(meta, open(meta_path, "w"))
    restored = load_model(str(tmp_path / "orbax"), make_mesh({"fsdp": 8}))
    assert restored.cfg == model.cfg
    _logits_close(restored, LLAMA_TIED)


@pytest.mark.skipif(not HF_PYTHON, reason="set KLONG_HF_PYTHON to a Python with transformers (.ci/run does)")
@pytest.mark.parametrize("case", ["llama_tied", "llama_untied_headdim", "qwen2_bias_tied", "qwen3_qknorm"])
def test_transformers_loads_our_llama_family_checkpoint(tmp_path, case):
    case_dir = os.path.join(FIXTURES, case)
    model = load_pretrained(case_dir, mesh=make_mesh({"fsdp": 8}))
    save_pretrained(model, str(tmp_path / "out"))
    subprocess.run([HF_PYTHON, os.path.join(ROOT, "tools", "hf_reference.py"), "logits", str(tmp_path / "out"),
                    os.path.join(case_dir, "inputs.npy"), str(tmp_path / "logits.npy")], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.load(os.path.join(case_dir, "logits.npy")),
                               atol=1e-4, rtol=0)


@pytest.mark.skipif(not HF_PYTHON, reason="set KLONG_HF_PYTHON to a Python with transformers (.ci/run does)")
def test_transformers_loads_our_checkpoint(tmp_path):
    model = load_pretrained(FIXTURE, mesh=make_mesh({"fsdp": 8}))
    save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=100_000)
    subprocess.run([HF_PYTHON, os.path.join(ROOT, "tools", "hf_reference.py"), "logits", str(tmp_path / "out"),
                    os.path.join(FIXTURE, "inputs.npy"), str(tmp_path / "logits.npy")], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.load(os.path.join(FIXTURE, "logits.npy")),
                               atol=1e-4, rtol=0)
