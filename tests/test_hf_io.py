"""HF checkpoint IO: streaming sharded load, save_pretrained round trips, errors, Orbax conversion."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from klong_jax.hf import load_pretrained, save_pretrained
from klong_jax.model_checkpoint import load_model, save_model
from klong_jax.sharding import make_mesh

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "groups_noNorm_scaled")
HF_PYTHON = os.environ.get("KLONG_HF_PYTHON")  # a Python with torch + transformers (see .ci/run)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _copy_fixture(tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(FIXTURE, dst)
    return dst


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


@pytest.mark.skipif(not HF_PYTHON, reason="set KLONG_HF_PYTHON to a Python with transformers (.ci/run does)")
def test_transformers_loads_our_checkpoint(tmp_path):
    model = load_pretrained(FIXTURE, mesh=make_mesh({"fsdp": 8}))
    save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=100_000)
    subprocess.run([HF_PYTHON, os.path.join(ROOT, "tools", "hf_reference.py"), "logits", str(tmp_path / "out"),
                    os.path.join(FIXTURE, "inputs.npy"), str(tmp_path / "logits.npy")], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.load(os.path.join(FIXTURE, "logits.npy")),
                               atol=1e-4, rtol=0)
