"""Golden logits against transformers' Glm4MoeForCausalLM (fixtures from tools/hf_reference.py)."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from klong_jax.hf import load_pretrained
from klong_jax.sharding import make_mesh

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "*", "")))
CASE_IDS = [os.path.basename(os.path.dirname(d)) for d in FIXTURES]


def test_fixtures_cover_the_features():
    cfgs = [json.load(open(os.path.join(d, "config.json"))) for d in FIXTURES]
    assert len(cfgs) >= 5
    assert {c["use_qk_norm"] for c in cfgs} == {True, False}
    assert {c["attention_bias"] for c in cfgs} == {True, False}
    assert {c["rope_parameters"]["partial_rotary_factor"] for c in cfgs} == {0.5, 1.0}
    assert any(c["n_group"] > 1 and c["topk_group"] < c["n_group"] for c in cfgs)
    assert {c["norm_topk_prob"] for c in cfgs} == {True, False}
    assert any(c["routed_scaling_factor"] != 1.0 for c in cfgs)
    assert {0, 2} <= {c["first_k_dense_replace"] for c in cfgs}
    assert any(c["n_shared_experts"] > 1 for c in cfgs)


@pytest.mark.parametrize("case_dir", FIXTURES, ids=CASE_IDS)
def test_logits_match_transformers(case_dir):
    model = load_pretrained(case_dir, compute_dtype="float32")
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
