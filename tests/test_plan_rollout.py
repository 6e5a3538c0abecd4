"""The rollout sampler of an RL stage compiled ahead of time, nothing allocated (klong_jax/rl/rollout_aot.py
compile_rollout): the session prefill, the decode loop and the weight sync, for the tiny stage-3 config on this
process's 8 emulated CPU devices; the reports' arithmetic, the cache's bytes and layout, donation and the
`colocated` sums."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs.rl_stage3 import get_config
from klong_jax.models.from_config import model_config_from
from klong_jax.rl.rollout_aot import compile_rollout, kv_cache_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, B = 256, 8          # cache slots (rl.seq_len) and rows (rl.max_concurrent_episodes)


def _config(**rollout):
    cfg = get_config("tiny")
    cfg.rl.seq_len, cfg.rl.max_concurrent_episodes = S, B
    for k, v in rollout.items():
        cfg.rollout[k] = v
    return cfg


def _check_peak(report):
    assert report["compiled"] and report["fits"]
    mem = report["per_device"]
    assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["temp_bytes"] + mem["output_bytes"]
                                 - mem["alias_bytes"]), mem
    return mem


def test_sampler_on_its_own_mesh_colocated(devices):
    """Sampler mesh fsdp 4 x tensor 2 on the trainer's 8 devices (fsdp 8), bf16 copy: the cache [L, B, S, K, H] has
    batch over fsdp and the 2 kv heads over tensor; prefill and decode donate it; the sync casts fp32 -> bf16."""
    cfg = _config(devices=8, mesh={"fsdp": 4, "tensor": 2}, dtype="bfloat16", session_chunk=32)
    peak_update = 10 ** 8          # the update's peak as given to the verdict (as from an earlier plan)
    out = compile_rollout(cfg, None, max_new=64, rl_update_peak_bytes=peak_update)
    m = model_config_from(cfg.model)
    L, K, H = m.num_hidden_layers, m.num_key_value_heads, m.head_dim
    assert (L, K, H) == (4, 2, 32)
    assert out["placement"] == "colocated" and out["sampler_devices"] == 8
    assert out["sampler_mesh"]["fsdp"] == 4 and out["sampler_mesh"]["tensor"] == 2
    assert (out["B"], out["S"], out["C"], out["N"]) == (B, S, 32, 64)
    # The whole cache: k and v, L x B x S x K x H bf16 = 2 x 4 x 8 x 256 x 2 x 32 x 2 B = 2 MiB; per chip 1/8 of it
    # (8 rows over fsdp 4, 2 kv heads over tensor 2: no replication).
    kv = out["kv_cache"]
    assert out["cache_dtype"] == "bfloat16"
    assert kv["total_bytes"] == 2 * L * B * S * K * H * 2 == kv_cache_bytes(m, B, S, 2) == 2_097_152
    assert kv["per_chip_bytes"] == kv["total_bytes"] // (4 * 2)
    assert kv["spec"] == "P(None, 'fsdp', None, 'tensor', None)"
    P_s, P_t, KV = out["sampler_params_per_chip_bytes"], out["trainer_state_per_chip_bytes"], kv["per_chip_bytes"]
    prefill, decode_, sync = (_check_peak(out["functions"][k]) for k in ("sampler_prefill", "sampler_decode",
                                                                         "weight_sync"))
    # The cache is donated and written in place: its bytes alias an output in both functions.
    assert prefill["alias_bytes"] >= KV and decode_["alias_bytes"] >= KV
    # The prefill's arguments: the sampler's params, the cache and the chunk (ids and positions [B, C] int32,
    # kv_valid [B, S] bool; 2 rows per chip over fsdp 4).
    chunk = 2 * (B // 4) * 32 * 4 + (B // 4) * S
    assert prefill["argument_bytes"] >= P_s + KV + chunk
    assert decode_["argument_bytes"] >= P_s + KV
    # The sync reads the trainer's fp32 params (8 shards: fsdp 8) and writes the bf16 copy in the sampler's layout
    # (8 shards: fsdp 4 x tensor 2): per chip 4 B / 2 B = 2x the copy's bytes, up to the small leaves one of the
    # layouts cannot split (norms, biases, the router bias: within 2%).
    ws = out["weight_sync"]
    assert not ws["staged"] and ws["copy_bytes_per_sampler_chip"] == 0
    assert sync["alias_bytes"] == 0 and sync["output_bytes"] >= ws["synced_bytes_per_sampler_chip"]
    assert ws["synced_bytes_per_sampler_chip"] <= P_s
    assert abs(sync["argument_bytes"] / ws["synced_bytes_per_sampler_chip"] - 2) < 0.02
    # colocated: the phases are the documented sums.
    col = out["colocated"]
    assert col["applies"] and col["refused"] == [] and col["fits"] is None       # no HBM without a topology
    gib = 2 ** 30
    want = {"update": peak_update + P_s + KV, "prefill": prefill["peak_bytes"] + P_t,
            "decode": decode_["peak_bytes"] + P_t}
    for k, v in want.items():
        assert col["phases_gib"][k] == round(v / gib, 2), (k, v)
    assert col["phases_gib"]["sync"] >= round((sync["peak_bytes"] + P_s + KV) / gib, 2)


def test_sampler_on_other_devices_stages_the_sync(devices):
    """Sampler on devices 4-7 (rollout.first_device 4): the sync is compiled on the trainer's 8 devices into the
    sampler's layout x sync 2, and each sampler chip then receives its shard (bytes reported); no colocated verdict."""
    cfg = _config(devices=4, first_device=4, mesh={"fsdp": 2, "tensor": 2})
    out = compile_rollout(cfg, None, functions=("weight_sync",))
    assert out["placement"] == "separate" and out["sampler_devices"] == 4
    assert set(out["functions"]) == {"weight_sync"}
    ws = out["weight_sync"]
    assert ws["staged"] and ws["copy_bytes_per_sampler_chip"] == ws["synced_bytes_per_sampler_chip"] > 0
    sync = _check_peak(out["functions"]["weight_sync"])
    # fp32 both sides: each trainer chip holds 1/8 of the model before and 1/4 (a sampler chip's share) after.
    assert sync["output_bytes"] >= ws["copy_bytes_per_sampler_chip"] >= 1.5 * sync["argument_bytes"]
    assert out["colocated"] == {"applies": False, "fits": None,
                                "why": "the sampler is on other chips than the trainer: each side's own reports "
                                       "decide"}
    # Batch rows round to the sampler's batch devices (fsdp 2): 8 rows.
    assert out["B"] == B and out["kv_cache"]["per_chip_bytes"] == out["kv_cache"]["total_bytes"] // 4


def test_compile_rollout_names_bad_input():
    with pytest.raises(ValueError, match="unknown rollout functions"):
        compile_rollout(_config(), None, functions=("sampler_prefill", "sampler_step"))
    with pytest.raises(ValueError, match=r"rl.seq_len=256 is not a multiple of rollout.session_chunk=96"):
        compile_rollout(_config(session_chunk=96), None, functions=("sampler_prefill",))
    with pytest.raises(ValueError, match="rollout.devices=3: a separate sampler mesh needs its chips to divide"):
        compile_rollout(_config(devices=3, first_device=4), None, functions=("weight_sync",))


def test_rollout_first_device_is_checked(devices):
    """rollout.first_device places the sampler from that device on; it needs rollout.devices and must fit."""
    from klong_jax.agent import RolloutConfig
    from klong_jax.agent.sampler_policy import rollout_model
    from klong_jax.models import init_model, preset

    with pytest.raises(ValueError, match=r"rollout.first_device=2: must be >= 0, and > 0 only with rollout.devices"):
        RolloutConfig(first_device=2)
    with pytest.raises(ValueError, match="rollout.first_device=-1"):
        RolloutConfig(devices=2, first_device=-1)
    assert RolloutConfig.from_mapping({"devices": 4, "first_device": 4}).first_device == 4
    model = init_model(preset("tiny", num_hidden_layers=1), seed=0)
    with pytest.raises(ValueError, match=r"rollout.devices=4: this process has 8 devices .* from "
                                         r"rollout.first_device=6 on it needs 10"):
        rollout_model(model, None, RolloutConfig(devices=4, first_device=6))
    _, mesh = rollout_model(model, None, RolloutConfig(devices=2, first_device=6))
    assert [d.id for d in mesh.devices.flat] == [6, 7]


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_plan_compiles_the_rollout_for_tpu_topology():
    """launch/plan.py in a subprocess (libtpu never loads into the test process): the tiny stage-3 sampler on a
    4-chip v5p, its own mesh fsdp 2 x tensor 2 on the trainer's chips, and the verdict from a given update peak."""
    assert importlib.util.find_spec("libtpu"), "libtpu is missing: install the [tpu] extra (pyproject.toml)"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"),
                           "--config=configs/rl_stage3.py:tiny", "--topology=v5p:2x2x1", "--rl_functions=sampler_prefill,sampler_decode,weight_sync",
                           "--rollout_mesh=fsdp:2,tensor:2", "--rl_update_peak_gib=1.0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout)
    assert "compiled" not in result                     # no RL update function was asked for
    out = result["rollout"]
    assert out["topology"] == "v5p:2x2x1" and out["hbm_gib"] == 95.0 and out["placement"] == "colocated"
    assert out["kv_cache"]["spec"] == "P(None, 'fsdp', None, 'tensor', None)"
    for name in ("sampler_prefill", "sampler_decode", "weight_sync"):
        _check_peak(out["functions"][name])
    col = out["colocated"]
    assert col["fits"] is True and col["rl_update_peak_gib"] == 1.0
    assert col["phases_gib"]["update"] == round((2 ** 30 + out["sampler_params_per_chip_bytes"]
                                                 + out["kv_cache"]["per_chip_bytes"]) / 2 ** 30, 2)
