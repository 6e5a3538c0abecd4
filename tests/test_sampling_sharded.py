"""Sampler on an 8-device mesh equals single-device generation; weight updates swap and reshard."""
import jax
import numpy as np
import pytest
from flax import nnx
from test_sampling import CFG, GREEDY, _prompts, forward_check

from klong_jax.models import init_model
from klong_jax.sampling import Sampler
from klong_jax.sharding import make_mesh

LENS = (3, 17, 9, 30, 12, 1, 25, 6)
PARAMS = [GREEDY if i % 2 == 0 else GREEDY.replace(temperature=0.8, top_p=0.9, seed=i) for i in range(8)]


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def single_device_out(model):
    return Sampler(model, default_stop_token_ids=()).generate(_prompts(LENS), PARAMS)


@pytest.fixture(scope="module")
def mesh_samplers(model):
    """Samplers by mesh shape, built once per module (the update test reuses the expert one)."""
    cache = {}

    def get(shape):
        key = tuple(sorted(shape.items()))
        if key not in cache:
            cache[key] = Sampler(model, mesh=make_mesh(shape), default_stop_token_ids=())
        return cache[key]

    return get


def _spec_axes(spec):
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


@pytest.mark.parametrize("shape", [{"fsdp": 2, "expert": 4}, {"data": 8}], ids=["fsdp2_expert4", "data8"])
def test_sharded_generation_equals_single_device(devices, mesh_samplers, single_device_out, shape):
    sampler = mesh_samplers(shape)
    mesh = sampler.mesh
    assert sampler.min_batch == 8                      # the batch spreads over all 8 devices
    if "expert" in shape:
        w_gate = sampler.state["moe_layers"]["mlp"]["w_gate"][...]
        assert "expert" in _spec_axes(w_gate.sharding.spec)
    out = sampler.generate(_prompts(LENS), PARAMS)
    for s, m in zip(single_device_out, out):
        assert m.tokens == s.tokens
        np.testing.assert_allclose(m.logprobs, s.logprobs, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(m.routed_experts, s.routed_experts)
        np.testing.assert_array_equal(m.prompt_routed_experts, s.prompt_routed_experts)
    # The KV cache is sharded by its logical axes: batch over the batch mesh axes.
    batch = sampler._put(sampler._host_batch(_prompts(LENS), PARAMS, [()] * 8, 8, 32))
    with jax.set_mesh(mesh):
        st, _ = sampler.prefill_fn(sampler.state, batch, 48, 16, False, False)
    cache_spec = st["cache"]["moe"]["k"].sharding.spec
    assert _spec_axes(cache_spec[1:2]) == {a for a, n in shape.items() if n > 1}


def test_update_params_swaps_weights_in_place_and_reshards(devices, mesh_samplers):
    sampler = mesh_samplers({"fsdp": 2, "expert": 4})
    prompts = _prompts(LENS[:4])
    before = sampler.generate(prompts, GREEDY)
    other = init_model(CFG, seed=4)                     # single-device arrays: resharded on the way in
    sampler.update_params(nnx.state(other, nnx.Param))  # only the trained parameters
    after = sampler.generate(prompts, GREEDY)
    assert [c.tokens for c in after] != [c.tokens for c in before]
    assert [c.tokens for c in after] == forward_check(other, prompts, after)
    w = sampler.state["moe_layers"]["mlp"]["w_gate"][...]
    assert "expert" in _spec_axes(w.sharding.spec)
    # copy=True (the default): the sampler keeps working when the trainer deletes its arrays
    for leaf in jax.tree.leaves(nnx.state(other)):
        leaf.delete()
    assert [c.tokens for c in sampler.generate(prompts, GREEDY)] == [c.tokens for c in after]
    with pytest.raises(ValueError, match="shape"):
        sampler.update_params({"lm_head": np.zeros((3, 3), np.float32)})
    with pytest.raises(KeyError, match="not a variable"):
        sampler.update_params({"no_such_weight": np.zeros((3,), np.float32)})
