"""Sparse upcycling (models/upcycle.py) and its config hook (from_config, training.state.initial_model).

The invariant every test leans on: in an upcycled layer all E experts equal the dense FFN and the top-X
weights are renormalised (sum_x w_x = 1), so y = sum_x w_x FFN(h) = FFN(h) and the upcycled model's
logits equal the dense model's whatever the random router picks.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from klong_jax.hf import load_config, load_pretrained
from klong_jax.model_checkpoint import save_model
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.models.upcycle import UpcycleConfig, upcycle, upcycled_config
from klong_jax.sharding import make_mesh
from klong_jax.training.state import initial_model

LLAMA = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama_untied_headdim")  # 3 dense layers
IDS = np.load(os.path.join(LLAMA, "inputs.npy"))                                           # [2, 12]
# A wide router (std 1) so tokens really spread over the experts.
UP = UpcycleConfig(layers=2, experts=8, top_k=2, router_std=1.0, seed=3)


def _dense(mesh=None):
    return load_pretrained(LLAMA, compute_dtype="float32", mesh=mesh)


def _forward(model, mesh, **kw):
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, **kw))(state, IDS)


@pytest.mark.parametrize("kw,match", [
    (dict(layers=-1), "upcycle.layers=-1"), (dict(layers=1.5), "upcycle.layers=1.5"),
    (dict(experts=0), "upcycle.experts=0"), (dict(top_k=0), "upcycle.top_k=0"),
    (dict(experts=4, top_k=5), r"upcycle.top_k=5 must be in \[1, experts=4\]"),
    (dict(router_std=-0.1), "upcycle.router_std=-0.1"), (dict(router_std=float("nan")), "upcycle.router_std=nan"),
])
def test_upcycle_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        UpcycleConfig(**kw)
    assert not UpcycleConfig().enabled          # layers=0 is off


def test_upcycled_config():
    dense = load_config(LLAMA)
    cfg = upcycled_config(dense, UP)
    assert (cfg.model_type, cfg.first_k_dense_replace, cfg.num_moe_layers) == ("glm4_moe", 1, 2)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 24)
    assert (cfg.n_shared_experts, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.n_group) == (0, True, 1.0, 1)
    # the attention of the llama carries over unchanged
    assert (cfg.attention_bias, cfg.partial_rotary_factor, cfg.head_dim, cfg.tie_word_embeddings) == \
        (False, 1.0, 8, False)
    with pytest.raises(ValueError, match=r"upcycle.layers=4 must be in \[1, num_hidden_layers=3\]"):
        upcycled_config(dense, UpcycleConfig(layers=4))
    with pytest.raises(ValueError, match="already has 2 MoE layers"):
        upcycled_config(cfg, UP)


def test_upcycled_model_computes_the_dense_logits():
    dense = _dense()
    ref = np.asarray(dense(IDS))
    model = upcycle(dense, UP)
    logits, routed = model(IDS, return_routing=True)
    assert routed.shape == (2, 2, 12, 2)                        # [L_moe, B, T, X]
    assert len(np.unique(np.asarray(routed))) >= 6              # tokens spread over the experts
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=0)
    # Every expert of MoE layer i is dense layer 1 + i's FFN; the dense layer 0 stays where it was.
    src, out = nnx.state(dense), nnx.state(model)
    for i in range(2):
        for e in range(8):
            np.testing.assert_array_equal(out["moe_layers"]["mlp"]["w_down"].get_value()[i, e],
                                          src["dense_layers"]["mlp"]["down_proj"].get_value()[1 + i])
    np.testing.assert_array_equal(out["dense_layers"]["mlp"]["gate_proj"].get_value()[0],
                                  src["dense_layers"]["mlp"]["gate_proj"].get_value()[0])
    router = np.asarray(out["moe_layers"]["mlp"]["router"].get_value())
    assert router.shape == (2, 16, 8) and abs(router.std() - 1.0) < 0.15
    assert not np.asarray(out["moe_layers"]["mlp"]["router_bias"].get_value()).any()
    # The test can fail: one expert changed and the logits move.
    w = out["moe_layers"]["mlp"]["w_up"]
    w.set_value(w.get_value().at[1].multiply(1.5))
    assert np.abs(np.asarray(nnx.merge(*nnx.split(model))(IDS)) - ref).max() > 1e-3


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "expert": 4}, {"data": 2, "expert": 2, "tensor": 2}],
                         ids=["fsdp2xexpert4", "data2xexpert2xtensor2"])
def test_upcycle_on_an_expert_parallel_mesh(mesh_shape):
    mesh = make_mesh(mesh_shape)
    dense = _dense(mesh)
    ref = np.asarray(_forward(dense, mesh))
    model = upcycle(dense, UP, mesh=mesh)
    w = nnx.state(model)["moe_layers"]["mlp"]["w_gate"].get_value()    # [L_moe, E, D, F]
    ep = mesh.shape["expert"]
    assert w.sharding.spec[1] == "expert"
    assert all(s.data.shape[1] == 8 // ep for s in w.addressable_shards)  # built in shards, E split over `expert`
    np.testing.assert_allclose(np.asarray(_forward(model, mesh)), ref, atol=1e-5, rtol=0)


def test_routing_replay_on_the_upcycled_model():
    dense = _dense()
    ref = np.asarray(dense(IDS))
    model = upcycle(dense, UP)
    logits, routed = model(IDS, return_routing=True)
    np.testing.assert_array_equal(np.asarray(model(IDS, forced_experts_LBTX=routed)), np.asarray(logits))
    forced = np.broadcast_to(np.array([6, 7], np.int32), routed.shape)
    out_f, routed_f = model(IDS, forced_experts_LBTX=forced, return_routing=True)
    assert (np.asarray(routed_f) == forced).all()
    np.testing.assert_allclose(np.asarray(out_f), ref, atol=1e-5, rtol=0)   # identical experts: any choice
    # Make expert 7 different: forcing {6, 7} now changes the logits, forcing {0, 1} does not.
    w = nnx.state(model)["moe_layers"]["mlp"]["w_down"]
    w.set_value(w.get_value().at[:, 7].multiply(2.0))
    assert np.abs(np.asarray(model(IDS, forced_experts_LBTX=forced)) - ref).max() > 1e-3
    np.testing.assert_allclose(np.asarray(model(IDS, forced_experts_LBTX=np.zeros_like(forced) + [0, 1])),
                               ref, atol=1e-5, rtol=0)


def test_initial_model_upcycles_once_and_checks_the_architecture(tmp_path):
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    final_cfg = upcycled_config(load_config(LLAMA, compute_dtype="float32"), UP)
    model = initial_model(final_cfg, mesh, init_from=LLAMA, seed=0, upcycle=UP)
    assert model.cfg.arch_dict() == final_cfg.arch_dict()
    ref = np.asarray(_dense()(IDS))
    np.testing.assert_allclose(np.asarray(_forward(model, mesh)), ref, atol=1e-5, rtol=0)

    # Already upcycled (e.g. an SFT output): left as is, the router not drawn again (another seed here).
    save_model(model, str(tmp_path / "orbax"))
    again = initial_model(final_cfg, mesh, init_from=str(tmp_path / "orbax"), seed=0,
                          upcycle=UpcycleConfig(layers=2, experts=8, top_k=2, router_std=1.0, seed=99))
    for name in ("router", "w_gate"):
        np.testing.assert_array_equal(np.asarray(nnx.state(again)["moe_layers"]["mlp"][name].get_value()),
                                      np.asarray(nnx.state(model)["moe_layers"]["mlp"][name].get_value()))

    # config.model and the (upcycled) checkpoint disagree: every differing field is named.
    with pytest.raises(ValueError, match=r"2 field\(s\): n_routed_experts: config 4 vs checkpoint 8; "
                                         r"num_experts_per_tok: config 1 vs checkpoint 2"):
        initial_model(final_cfg.replace(n_routed_experts=4, num_experts_per_tok=1), mesh, init_from=LLAMA,
                      seed=0, upcycle=UP)
    # Upcycling off but config.model is the MoE architecture: the dense checkpoint does not fit.
    with pytest.raises(ValueError, match="first_k_dense_replace: config 1 vs checkpoint 3"):
        initial_model(final_cfg, mesh, init_from=LLAMA, seed=0)


def test_config_sections_carry_the_upcycle_subsection():
    final_cfg = upcycled_config(load_config(LLAMA), UP)
    section = ConfigDict({**final_cfg.__dict__, "eos_token_id": 2,
                          "upcycle": {"layers": 2, "experts": 8, "top_k": 2, "router_std": 1.0, "seed": 3}})
    assert model_config_from(section) == final_cfg.replace(eos_token_id=2)
    assert upcycle_config_from(section) == UP
    del section["upcycle"]
    assert upcycle_config_from(section) == UpcycleConfig() and not upcycle_config_from(section).enabled
    section["upcycle"] = {"layers": 2, "expert": 8}
    with pytest.raises(ValueError, match=r"config.model.upcycle has unknown fields \['expert'\]"):
        upcycle_config_from(section)
    # A run config saved before the rename holds the compute dtype as "dtype".
    legacy = {k: v for k, v in final_cfg.__dict__.items() if k != "compute_dtype"}
    assert model_config_from({**legacy, "dtype": "float32"}).compute_dtype == "float32"
    assert model_config_from({**legacy, "dtype": "float32", "compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"


def _llama_to_gguf(case_dir: str, path: str) -> str:
    """The safetensors llama fixture as an F32 GGUF file in llama.cpp's layout (Q/K rows of each head
    reordered for its interleaved rotary: [2, H/2] -> [H/2, 2]), as its converter writes SmolLM2."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.load(open(os.path.join(case_dir, "config.json")))
    t = load_file(os.path.join(case_dir, "model.safetensors"))
    N, K = hf["num_attention_heads"], hf["num_key_value_heads"]

    def interleave(w_OD, heads):
        return w_OD.reshape(heads, 2, w_OD.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w_OD.shape)

    w = gguf.GGUFWriter(path, "llama")
    for k, v in {"block_count": hf["num_hidden_layers"], "context_length": hf["max_position_embeddings"],
                 "embedding_length": hf["hidden_size"], "feed_forward_length": hf["intermediate_size"],
                 "attention.head_count": N, "attention.head_count_kv": K, "rope.dimension_count": hf["head_dim"],
                 "vocab_size": hf["vocab_size"]}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.rope.freq_base", hf["rope_parameters"]["rope_theta"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    for name, token in (("bos", 1), ("eos", 2), ("padding", 2)):
        w.add_uint32(f"tokenizer.ggml.{name}_token_id", token)
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    for i in range(hf["num_hidden_layers"]):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            w.add_tensor(p + ours + ".weight", t[q + theirs + ".weight"])
        w.add_tensor(p + "attn_q.weight", interleave(t[q + "self_attn.q_proj.weight"], N))
        w.add_tensor(p + "attn_k.weight", interleave(t[q + "self_attn.k_proj.weight"], K))
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_initial_model_upcycles_a_gguf_file(tmp_path):
    """GGUF (tied llama, as SmolLM2 ships) -> load_gguf -> upcycle: still transformers' dense logits."""
    tied = os.path.join(os.path.dirname(LLAMA), "llama_tied")
    path = _llama_to_gguf(tied, str(tmp_path / "tied.gguf"))
    up = UpcycleConfig(layers=2, experts=4, top_k=2, router_std=1.0, seed=0)
    final_cfg = upcycled_config(load_config(tied, compute_dtype="float32"), up)
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    model = initial_model(final_cfg, mesh, init_from=path, seed=0, upcycle=up)
    assert (model.cfg.num_moe_layers, model.cfg.tie_word_embeddings) == (2, True)
    ids = np.load(os.path.join(tied, "inputs.npy"))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids)
    np.testing.assert_allclose(np.asarray(out), np.load(os.path.join(tied, "logits.npy")), atol=1e-4, rtol=0)


@pytest.mark.skipif(not os.environ.get("KLONG_HF_PYTHON"), reason="set KLONG_HF_PYTHON to a Python with transformers")
def test_transformers_runs_the_upcycled_model(tmp_path):
    """An upcycled tied llama saves as a Glm4MoeForCausalLM (no shared expert, tied head) that transformers
    loads and runs to the dense model's logits."""
    import subprocess

    from klong_jax.hf import save_pretrained
    tied = os.path.join(os.path.dirname(LLAMA), "llama_tied")
    model = upcycle(load_pretrained(tied, compute_dtype="float32"),
                    UpcycleConfig(layers=1, experts=4, top_k=2, router_std=1.0))
    save_pretrained(model, str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["Glm4MoeForCausalLM"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([os.environ["KLONG_HF_PYTHON"], os.path.join(root, "tools", "hf_reference.py"), "logits",
                    str(tmp_path / "hf"), os.path.join(tied, "inputs.npy"), str(tmp_path / "logits.npy")],
                   check=True, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.load(os.path.join(tied, "logits.npy")),
                               atol=1e-4, rtol=0)
