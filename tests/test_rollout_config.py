"""config.rollout: the sampler's own copy of the policy, cast and placed apart from the trainer's.

A bf16 copy on one device of the 8-device test mesh must (1) leave the trainer's model untouched, (2) hold every
floating-point variable as the bf16 rounding of the trainer's, exactly, (3) live on that one device, (4) compute the
logits of the fp32 model within bf16 rounding, and (5) receive RL weight updates cast the same way. The config
section is checked at load, with errors naming the field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import klong, rl_common, sft
from klong_jax.agent import RolloutConfig
from klong_jax.agent.sampler_policy import SamplerPolicy, rollout_model
from klong_jax.models import init_model, preset
from klong_jax.sampling import SamplingParams
from klong_jax.sharding import make_mesh


def _tiny():
    cfg = preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2, n_routed_experts=4,
                 compute_dtype="float32", param_dtype="float32", attention_impl="reference")
    return init_model(cfg, make_mesh({"fsdp": -1}), seed=0)


def _leaves(model):
    return dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0])


def test_from_mapping_checks_fields():
    assert RolloutConfig.from_mapping(None) == RolloutConfig()
    got = RolloutConfig.from_mapping({"devices": 2, "mesh": {"tensor": 2}, "dtype": "bfloat16", "session_chunk": 32})
    assert got == RolloutConfig(devices=2, mesh=(("tensor", 2),), dtype="bfloat16", session_chunk=32)
    with pytest.raises(ValueError, match=r"unknown rollout config key\(s\) \['dtpye'\]"):
        RolloutConfig.from_mapping({"dtpye": "bfloat16"})
    with pytest.raises(ValueError, match="rollout.dtype='fp8'"):
        RolloutConfig(dtype="fp8")
    with pytest.raises(ValueError, match="rollout.devices=-1"):
        RolloutConfig(devices=-1)
    with pytest.raises(ValueError, match="rollout.devices=9: this process has 8 devices"):
        rollout_model(_tiny(), None, RolloutConfig(devices=9))


def test_every_stage_of_the_recipe_shares_the_sft_rollout_section():
    for variant in sft.VARIANTS:
        c = klong.get_config(variant)
        RolloutConfig.from_mapping(c.sft.rollout)          # every table row is a valid config
        for stage in (1, 2, 3):
            assert c[f"rl_stage{stage}"].rollout is c.sft.rollout
        assert rl_common.rl_config(1, variant).rollout.to_dict() == c.sft.rollout.to_dict()


def test_bf16_copy_on_one_device():
    model = _tiny()
    before = {k: np.asarray(v) for k, v in _leaves(model).items()}
    copy, mesh = rollout_model(model, model_mesh := make_mesh({"fsdp": -1}),
                               RolloutConfig(devices=1, dtype="bfloat16"))
    assert mesh is not model_mesh and mesh.devices.size == 1
    assert copy.cfg.param_dtype == copy.cfg.compute_dtype == "bfloat16"
    assert model.cfg.param_dtype == "float32"
    after, got = _leaves(model), _leaves(copy)
    assert set(got) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), v)            # the trainer's weights untouched
        if np.issubdtype(v.dtype, np.floating):
            assert got[k].dtype == jnp.bfloat16, k
            np.testing.assert_array_equal(np.asarray(got[k]), v.astype(jnp.bfloat16))
        else:
            np.testing.assert_array_equal(np.asarray(got[k]), v)
    # The sampler built from it holds its weights on that one device, and computes the fp32 model's logits
    # within bf16 rounding: 2^-8 relative per rounded operand, accumulated over 2 layers of a random model whose
    # logits are small (|logits| <= 0.6): measured 5.2% of the logit scale, correlation 0.99991.
    policy = SamplerPolicy.from_model(model, make_mesh({"fsdp": -1}), rollout=RolloutConfig(devices=1,
                                                                                            dtype="bfloat16"))
    assert {d for x in jax.tree.leaves(policy.sampler.state) for d in x.devices()} == {jax.devices()[0]}
    ids = np.arange(3, 35, dtype=np.int32)[None]
    want = np.asarray(model(ids), np.float32)
    got_logits = np.asarray(copy(ids), np.float32)
    assert np.abs(got_logits - want).max() < 0.1 * np.abs(want).max()
    assert np.corrcoef(got_logits.ravel(), want.ravel())[0, 1] > 0.999
    out = policy.sampler.generate([list(range(3, 20))], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(out[0].tokens) == 4


def test_updates_reach_the_copy_cast():
    model = _tiny()
    mesh = make_mesh({"fsdp": -1})
    policy = SamplerPolicy.from_model(model, mesh, rollout=RolloutConfig(devices=1, dtype="bfloat16"))
    new = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with jax.set_mesh(mesh):     # as the RL loop calls it: inside the trainer's 8-device mesh
        policy.update_params(new)
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(policy.sampler.state))[0])
    for k, v in flat_new.items():
        assert flat_got[k].dtype == jnp.bfloat16 and flat_got[k].devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(v).astype(jnp.bfloat16))


def test_rollout_mesh_without_a_device_count_spans_every_device_and_first_device_offsets(devices):
    """rollout.mesh with devices 0: that mesh over all 8 devices (not the trainer's); devices 4 from first_device 4:
    a mesh over devices 4-7 in order; the defaults keep the trainer's mesh itself."""
    model, trainer_mesh = _tiny(), make_mesh({"fsdp": -1})
    _, mesh = rollout_model(model, trainer_mesh, RolloutConfig(mesh=(("data", 2), ("tensor", 4))))
    assert dict(mesh.shape) == {**{a: 1 for a in mesh.axis_names}, "data": 2, "tensor": 4}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    _, mesh = rollout_model(model, trainer_mesh, RolloutConfig(devices=4, first_device=4))
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[4:]]
    assert rollout_model(model, trainer_mesh, RolloutConfig())[1] is trainer_mesh
