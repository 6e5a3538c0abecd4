"""Golden logits against transformers' Glm4MoeForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM (fixtures from tools/hf_reference.py)."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from klong_jax.hf import load_pretrained
from klong_jax.sharding import make_mesh

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "*", "")))
CASE_IDS = [os.path.basename(os.path.dirname(d)) for d in FIXTURES]
CONFIGS = {d: json.load(open(os.path.join(d, "config.json"))) for d in FIXTURES}
DENSE = [d for d in FIXTURES if CONFIGS[d]["model_type"] != "glm4_moe"]


def test_fixtures_cover_the_features():
    cfgs = [c for c in CONFIGS.values() if c["model_type"] == "glm4_moe"]
    assert len(cfgs) >= 5
    assert {c["use_qk_norm"] for c in cfgs} == {True, False}
    assert {c["attention_bias"] for c in cfgs} == {True, False}
    assert {c["rope_parameters"]["partial_rotary_factor"] for c in cfgs} == {0.5, 1.0}
    assert any(c["n_group"] > 1 and c["topk_group"] < c["n_group"] for c in cfgs)
    assert {c["norm_topk_prob"] for c in cfgs} == {True, False}
    assert any(c["routed_scaling_factor"] != 1.0 for c in cfgs)
    assert {0, 2} <= {c["first_k_dense_replace"] for c in cfgs}
    assert any(c["n_shared_experts"] > 1 for c in cfgs)


def test_dense_fixtures_cover_the_families():
    cfgs = [CONFIGS[d] for d in DENSE]
    assert {c["model_type"] for c in cfgs} == {"llama", "qwen2", "qwen3"}
    assert {c["tie_word_embeddings"] for c in cfgs if c["model_type"] == "llama"} == {True, False}
    # head_dim given apart from hidden_size / heads, and left implicit
    assert any(c.get("head_dim") not in (None, c["hidden_size"] // c["num_attention_heads"]) for c in cfgs)
    assert any(c.get("head_dim") in (None, c["hidden_size"] // c["num_attention_heads"]) for c in cfgs)
    for d in DENSE:  # a tied checkpoint stores no lm_head.weight
        keys = set(load_file(os.path.join(d, "model.safetensors")))
        assert ("lm_head.weight" in keys) == (not CONFIGS[d]["tie_word_embeddings"]), d


@pytest.mark.parametrize("case_dir", FIXTURES, ids=CASE_IDS)
def test_logits_match_transformers(case_dir):
    model = load_pretrained(case_dir, compute_dtype="float32")
    assert model.cfg.model_type == CONFIGS[case_dir]["model_type"]
    if model.cfg.num_moe_layers:
        bias = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
        assert any(np.abs(np.asarray(v.get_value())).max() > 0 for _, v in bias), "router bias must be non-zero"
    ids = np.load(os.path.join(case_dir, "inputs.npy"))
    ref = np.load(os.path.join(case_dir, "logits.npy"))
    out = np.asarray(model(ids))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"fsdp": 2, "expert": 4},
                                        {"data": 2, "expert": 2, "tensor": 2}],
                         ids=["fsdp2xtensor4", "fsdp2xexpert4", "data2xexpert2xtensor2"])
def test_sharded_load_matches_single_device(mesh_shape):
    case_dir = [d for d in FIXTURES if "groups" in d][0]
    ids = np.load(os.path.join(case_dir, "inputs.npy"))
    ref = np.load(os.path.join(case_dir, "logits.npy"))
    mesh = make_mesh(mesh_shape)
    model = load_pretrained(case_dir, compute_dtype="float32", mesh=mesh)
    graphdef, state = nnx.split(model)
    # Parameters really are distributed over the mesh, not replicated.
    specs = {str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(state)}
    assert any(s != "PartitionSpec()" for s in specs)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case_dir", DENSE, ids=[os.path.basename(os.path.dirname(d)) for d in DENSE])
def test_dense_families_on_the_8_device_mesh(case_dir):
    """fsdp 2 x tensor 4: heads, MLP width and the (tied) vocab split over tensor, embed over fsdp."""
    ids = np.load(os.path.join(case_dir, "inputs.npy"))
    ref = np.load(os.path.join(case_dir, "logits.npy"))
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    model = load_pretrained(case_dir, compute_dtype="float32", mesh=mesh)
    graphdef, state = nnx.split(model)
    assert "lm_head" not in state if model.cfg.tie_word_embeddings else "lm_head" in state
    assert state["embed_tokens"].get_value().sharding.spec == P("tensor", "fsdp")
    with jax.set_mesh(mesh):
        out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
