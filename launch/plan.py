"""Plan a run without allocating: parameter counts and per-device memory on a mesh, as one JSON object.

  python launch/plan.py --config=configs/sft.py:glm45_air --num_devices=256
  python launch/plan.py --config=configs/sft.py:glm45_air --topology=v5p:4x4x8   # AOT-compile the step
  python launch/plan.py --config=configs/rl_stage3.py:glm45_air --topology=v5p:4x4x4 \
      --config.rl.seq_len=32768 --config.rl.batch_rows=64                          # an RL stage's update
With --topology (needs the [tpu] extra: libtpu) the real train step is compiled for that TPU topology from
this machine, with the configured mesh and shardings, and the compiled per-device memory, FLOPs and compile
seconds are added ("compiled"). An RL stage config (config.kind == "rl") compiles the RL loop's functions instead
(klong_jax/rl/aot.py compile_rl_update): `rl_update` (one optimizer step on a batch of rl.batch_rows rows of
rl.seq_len tokens, donated state, through the loop's jit wrapper), `old_logprobs` (the forward pass(es) before the
update; its `fits` counts the optimizer state that stays on device meanwhile) and, with rl.minibatches > 0,
`rl_minibatch` (the step over a mini-batch of micro-batches); and the rollout sampler's (klong_jax/rl/rollout_aot.py
compile_rollout, under "rollout"): `sampler_prefill` (a session prefill call: rollout.session_chunk tokens x
rl.max_concurrent_episodes rows into a cache of rl.seq_len slots), `sampler_decode` (the decode loop on that cache)
and `weight_sync` (the trainer's params cast and resharded to the sampler's copy), with the KV cache's bytes and the
`colocated` verdict (training and sampling on the same chips). --rl_functions picks a subset of both lists;
--rollout_mesh puts the sampler on a mesh of its own axes (over all chips unless --config.rollout.devices /
first_device say otherwise); --rl_update_peak_gib gives the update's peak for the verdict when rl_update is not
compiled in the same call. Nothing is allocated either way.

  python launch/plan.py --config=configs/rl_stage3.py:glm45_air --topology=v5p:4x8x8 \
      --rl_functions=sampler_prefill,sampler_decode,weight_sync --rollout_mesh=fsdp:8,expert:8,tensor:4
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no libtpu process lock needed

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from klong_jax.models.from_config import model_config_from  # noqa: E402
from klong_jax.planning import plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sft.py:glm45_air")
_DEVICES = flags.DEFINE_integer("num_devices", 256, "devices of the mesh to plan for (without --topology)")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology to AOT-compile the train step for, e.g. v5p:4x4x8")
_RL_FUNCTIONS = flags.DEFINE_list("rl_functions", None, "RL configs with --topology: which of rl_update, "
                                  "old_logprobs, rl_minibatch, sampler_prefill, sampler_decode, weight_sync to compile "
                                  "(default: rl_update, old_logprobs, rl_minibatch when rl.minibatches > 0, and the "
                                  "three rollout functions)")
_ROLLOUT_MESH = flags.DEFINE_string("rollout_mesh", "", "RL configs: the sampler's mesh axes, e.g. "
                                    "fsdp:8,expert:8,tensor:4 (sets config.rollout.mesh: over every chip, the "
                                    "trainer's, unless rollout.devices / first_device say otherwise)")
_ROLLOUT_MAX_NEW = flags.DEFINE_integer("rollout_max_new", 4096, "N: the decode state's new-token columns")
_UPDATE_PEAK = flags.DEFINE_float("rl_update_peak_gib", None, "the RL update's per-chip peak (GiB) for the "
                                  "`colocated` verdict when rl_update is not compiled in this call")
_OUT = flags.DEFINE_string("out", "", "also write the JSON here")


def compile_rl(cfg, topology: str) -> dict:
    """{"compiled": the RL update functions asked (compile_rl_update), "rollout": the rollout functions asked
    (compile_rollout, its `colocated` verdict from this call's rl_update peak or --rl_update_peak_gib)}."""
    from klong_jax.rl.aot import RL_FUNCTIONS, compile_rl_update
    from klong_jax.rl.rollout_aot import ROLLOUT_FUNCTIONS, compile_rollout
    from klong_jax.sharding.mesh import parse_mesh_spec
    from klong_jax.training.aot import GIB
    asked = _RL_FUNCTIONS.value
    unknown = set(asked or ()) - set(RL_FUNCTIONS) - set(ROLLOUT_FUNCTIONS)
    if unknown:
        raise app.UsageError(f"--rl_functions: unknown {sorted(unknown)}; choose from "
                             f"{RL_FUNCTIONS + ROLLOUT_FUNCTIONS}")
    rl_fns = None if asked is None else tuple(f for f in asked if f in RL_FUNCTIONS)
    rollout_fns = ROLLOUT_FUNCTIONS if asked is None else tuple(f for f in asked if f in ROLLOUT_FUNCTIONS)
    if _ROLLOUT_MESH.value:      # over every chip unless rollout.devices says how many
        cfg.rollout.mesh = parse_mesh_spec(_ROLLOUT_MESH.value)
    out = {}
    if rl_fns is None or rl_fns:
        out["compiled"] = compile_rl_update(cfg, topology, functions=rl_fns)
    if rollout_fns:
        peak = None
        update = out.get("compiled", {}).get("functions", {}).get("rl_update")
        if update is not None and update.get("compiled"):
            peak = update["per_device"]["peak_bytes"]
        elif _UPDATE_PEAK.value is not None:
            peak = int(_UPDATE_PEAK.value * GIB)
        out["rollout"] = compile_rollout(cfg, topology, rollout_fns, max_new=_ROLLOUT_MAX_NEW.value,
                                         rl_update_peak_bytes=peak)
    return out


def main(_):
    cfg = _CONFIG.value
    result = {"config": cfg.get("variant", "")}
    if _TOPOLOGY.value:
        from klong_jax.training.aot import compile_train_step
        from jax.experimental import topologies
        n = len(topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices)
        result.update(plan(model_config_from(cfg.model), dict(cfg.mesh.shape), n))
        if cfg.get("kind") == "rl":
            result.update(compile_rl(cfg, _TOPOLOGY.value))
        else:
            result["compiled"] = compile_train_step(cfg, _TOPOLOGY.value)
    else:
        result.update(plan(model_config_from(cfg.model), dict(cfg.mesh.shape), _DEVICES.value))
    text = json.dumps(result, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
