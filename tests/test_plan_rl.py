"""launch/plan.py for RL stage configs: the RL loop's update functions compiled ahead of time, nothing allocated
(klong_jax/rl/aot.py compile_rl_update).

The in-process test compiles the tiny stage-3 config for this process's 8 emulated CPU devices; the TPU one runs
launch/plan.py in a subprocess (libtpu never loads into the test process) for a 4-chip v5p topology.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs.rl_stage3 import get_config
from configs.sft import get_config as sft_config
from klong_jax.rl.aot import compile_rl_update
from klong_jax.training.aot import compile_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_reports(compiled: dict, functions: tuple):
    assert compiled["kind"] == "rl" and compiled["fits"] is True
    assert tuple(compiled["functions"]) == functions
    for name, report in compiled["functions"].items():
        assert report["compiled"] and report["fits"], name
        mem = report["per_device"]
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes"):
            assert mem[key] > 0, (name, key, mem)
        assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["temp_bytes"] + mem["output_bytes"]
                                     - mem["alias_bytes"]), (name, mem)
        assert mem["peak_bytes"] >= mem["argument_bytes"], (name, mem)
        assert report["flops_per_device"] > 0 and report["compile_s"] > 0, (name, report)
    update, old = compiled["functions"]["rl_update"], compiled["functions"]["old_logprobs"]
    # The state is donated: the new state is written over the old one.
    assert update["per_device"]["alias_bytes"] > 0
    # The optimizer state stays on device while the old log-probs are computed; the update takes it as an argument.
    resident = old["per_device"]["resident_bytes"]
    assert resident > 0
    assert update["per_device"]["argument_bytes"] >= old["per_device"]["argument_bytes"] + resident
    # Forward and backward against the old log-probs' forward pass(es).
    assert update["flops_per_device"] > old["flops_per_device"]


def test_compile_rl_update_tiny_on_cpu_devices(devices):
    cfg = get_config("tiny")
    cfg.rl.seq_len, cfg.rl.batch_rows = 256, 8          # one row per device of the 8-device fsdp mesh
    compiled = compile_rl_update(cfg, None, functions=("rl_update", "old_logprobs"))
    assert compiled["devices"] == 8 and compiled["mesh"]["fsdp"] == 8
    assert (compiled["seq_len"], compiled["batch_rows"]) == (256, 8)
    _check_reports(compiled, ("rl_update", "old_logprobs"))
    # replay_gap: the old log-probs with and without routing replay, two [B, T] fp32 arrays, one row per device.
    assert compiled["functions"]["old_logprobs"]["per_device"]["output_bytes"] >= 2 * 256 * 4


@pytest.mark.slow
def test_compile_train_step_tiny_on_cpu_devices(devices):
    """The SFT step through the same abstract run layout (TrainLayout: state, rest, frozen)."""
    cfg = sft_config("tiny")
    cfg.train.seq_len, cfg.train.global_batch = 256, 8
    compiled = compile_train_step(cfg, None)
    assert compiled["compiled"] and compiled["fits"] and compiled["trainable"] == "all"
    mem = compiled["per_device"]
    assert mem["alias_bytes"] > 0 and mem["peak_bytes"] >= mem["argument_bytes"] > 0 and mem["temp_bytes"] > 0
    assert compiled["flops_per_device"] > 0 and compiled["compile_s"] > 0


def test_compile_rl_update_rejects_unknown_functions():
    with pytest.raises(ValueError, match="unknown RL functions"):
        compile_rl_update(get_config("tiny"), None, functions=("rl_update", "sft_step"))


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_plan_compiles_rl_stage_for_tpu_topology():
    assert importlib.util.find_spec("libtpu"), "libtpu is missing: install the [tpu] extra (pyproject.toml)"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--config=configs/rl_stage3.py:tiny",
                           "--topology=v5p:2x2x1", "--rl_functions=rl_update,old_logprobs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    compiled = json.loads(proc.stdout)["compiled"]
    assert compiled["topology"] == "v5p:2x2x1" and compiled["devices"] == 4 and compiled["hbm_gib"] == 95.0
    _check_reports(compiled, ("rl_update", "old_logprobs"))
