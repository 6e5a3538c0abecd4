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


def _turns(prompts, outs, seed):
    """The next turn of each session: its prompt, its completion, then a few new tokens (a tool result)."""
    rng = np.random.default_rng(seed)
    return [p + o.tokens + rng.integers(2, CFG.vocab_size, 5 + 3 * i).tolist()
            for i, (p, o) in enumerate(zip(prompts, outs))]


def test_session_cache_sharded_over_tensor_equals_single_device(devices, model):
    """Sessions (a persistent cache kept over turns) on a mesh with batch over data 4 and the 2 kv heads over
    tensor 2: the same tokens over three turns as one device, and the cache really carries both axes."""
    assert CFG.num_key_value_heads == 2                  # divisible by tensor=2: the kv-heads dim is sharded
    sharded = Sampler(model, mesh=make_mesh({"data": 4, "tensor": 2}), default_stop_token_ids=(), session_chunk=16)
    single = Sampler(model, default_stop_token_ids=(), session_chunk=16)
    ids = [f"episode{i}" for i in range(4)]
    prompts = _prompts(LENS[:4])
    params = [GREEDY, PARAMS[1], GREEDY, PARAMS[3]]
    for turn in range(3):
        a = sharded.generate(prompts, params, session_ids=ids)
        b = single.generate(prompts, params, session_ids=ids)
        for x, y in zip(a, b):
            assert x.tokens == y.tokens, turn
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(x.prompt_routed_experts, y.prompt_routed_experts)
        prompts = _turns(prompts, a, seed=turn)
    # Turns 2 and 3 reused the cached k/v (only the new tokens were prefilled), on both samplers alike.
    assert sharded.stats["reused_tokens"] == single.stats["reused_tokens"] > 0
    # The persistent cache [L, B, S, K, H]: batch over data, kv heads over tensor, 2 x 4 = 8 shards of each array.
    k = sharded.sessions.cache["moe"]["k"]
    spec = k.sharding.spec
    assert spec[1] == "data" and spec[3] == "tensor", spec
    L, B, S, K, H = k.shape
    assert k.sharding.shard_shape(k.shape) == (L, B // 4, S, K // 2, H)


@pytest.mark.parametrize("placement", ["separate", "colocated"])
def test_weight_sync_to_a_sampler_mesh(devices, placement):
    """The sampler on its own mesh, in the model's fp32 (so tokens compare exactly): "separate" (fsdp 2 x tensor 2) on
    devices 4-7 (rollout.first_device=4) beside a trainer on devices 0-3; "colocated" on the trainer's 8 devices
    (data 4 x tensor 2 against the trainer's fsdp 8). update_params moves the trainer's new weights into the
    sampler's layout (colocated: one compiled cast + reshard; separate: a device_put across, then the cast);
    generation then equals a sampler built fresh from the new model, and differs from before."""
    from klong_jax.agent import RolloutConfig
    from klong_jax.agent.sampler_policy import SamplerPolicy
    from klong_jax.sharding import state_shardings

    if placement == "separate":
        trainer_mesh = make_mesh({"fsdp": 4}, jax.devices()[:4])
        rollout = RolloutConfig(devices=4, first_device=4, mesh=(("fsdp", 2), ("tensor", 2)))
        trainer_ids, sampler_ids = {0, 1, 2, 3}, {4, 5, 6, 7}
    else:
        trainer_mesh = make_mesh({"fsdp": 8})
        rollout = RolloutConfig(devices=8, mesh=(("data", 4), ("tensor", 2)))
        trainer_ids = sampler_ids = set(range(8))

    def on_trainer(seed):
        with jax.set_mesh(trainer_mesh):
            m = init_model(CFG, seed=seed)
            graphdef, state = nnx.split(m)
            return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, trainer_mesh)))

    def ids(tree):
        return {d.id for x in jax.tree.leaves(tree) for d in x.devices()}

    old, new = on_trainer(3), on_trainer(4)
    assert ids(nnx.state(new)) == trainer_ids
    policy = SamplerPolicy.from_model(old, trainer_mesh, rollout=rollout, default_stop_token_ids=())
    sampler = policy.sampler
    assert ids(sampler.state) == sampler_ids
    prompts = _prompts(LENS[:4])
    before = sampler.generate(prompts, GREEDY)
    with jax.set_mesh(trainer_mesh):                    # as the RL loop calls it
        policy.update_params(nnx.state(new, nnx.Param))
    assert sampler.stats["fused_weight_syncs"] == (1 if placement == "colocated" else 0)
    assert ids(sampler.state) == sampler_ids
    w = sampler.state["moe_layers"]["mlp"]["w_gate"][...]
    assert "tensor" in _spec_axes(w.sharding.spec)       # the sampler's layout, not the trainer's fsdp
    after = sampler.generate(prompts, GREEDY)
    fresh = SamplerPolicy.from_model(new, trainer_mesh, rollout=rollout, default_stop_token_ids=()).sampler
    want = fresh.generate(prompts, GREEDY)
    assert [c.tokens for c in after] == [c.tokens for c in want]
    assert [c.tokens for c in after] != [c.tokens for c in before]   # the weights did change
    for a, b in zip(after, want):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
