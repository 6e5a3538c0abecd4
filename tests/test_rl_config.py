"""The typed `rl` section: every shipped stage config loads; each bad value is an error naming the field."""
import pytest

from configs import klong, rl_common
from klong_jax.rl.config import RLConfig

VARIANTS = tuple(rl_common.STAGES)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stage", (1, 2, 3))
def test_every_stage_config_loads(variant, stage):
    section = rl_common.rl_config(stage, variant).rl
    rl = RLConfig.from_mapping(section)
    assert rl.to_dict() == dict(section.items())


@pytest.mark.parametrize("arg", ("smol", "smol,stage3_only", "tiny"))
def test_pipeline_stages_load(arg):
    cfg = klong.get_config(arg)
    for stage in (1, 2, 3):
        RLConfig.from_mapping(cfg[f"rl_stage{stage}"].rl)


BASE = dict(rl_common.rl_config(3, "tiny").rl.items())


@pytest.mark.parametrize("field, value, says", [
    ("steps", 0, "rl.steps=0 must be an integer >= 1"),
    ("group_size", 1, "rl.group_size=1 must be an integer >= 2"),
    ("advantage", "ppo", "rl.advantage='ppo' must be one of ('grpo', 'dr_grpo', 'rloo')"),
    ("eps_low", 1.0, "rl.eps_low=1.0 must be in [0, 1)"),
    ("eps_high", -0.1, "rl.eps_high=-0.1 must be >= 0"),
    ("kl_coef", -1e-3, "rl.kl_coef=-0.001 must be >= 0 (0: off)"),
    ("tis_cap", -2.0, "rl.tis_cap=-2.0 must be >= 0"),
    ("minibatches", -1, "rl.minibatches=-1 must be an integer >= 0"),
    ("packing", "best_fit", "rl.packing='best_fit' must be one of ('shared_prefix', 'standard')"),
    ("routing_replay", 1, "rl.routing_replay=1 must be true or false"),
    ("batch_rows", True, "rl.batch_rows=True must be an integer >= 1"),
])
def test_bad_values_name_the_field(field, value, says):
    with pytest.raises(ValueError) as e:
        RLConfig.from_mapping({**BASE, field: value})
    assert says in str(e.value)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown rl config key\(s\) \['tasks_per_stp'\]"):
        RLConfig.from_mapping({**BASE, "tasks_per_stp": 2})


def test_missing_required_field():
    section = dict(BASE)
    del section["steps"]
    with pytest.raises(TypeError, match="steps"):
        RLConfig.from_mapping(section)
