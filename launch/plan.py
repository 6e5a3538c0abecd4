"""Plan a run without allocating: parameter counts and per-device memory on a mesh, as one JSON object.

  python launch/plan.py --config=configs/sft.py:glm45_air --num_devices=256
  python launch/plan.py --config=configs/sft.py:glm45_air --topology=v5p:4x4x8   # AOT-compile the step
  python launch/plan.py --config=configs/rl_stage3.py:glm45_air --topology=v5p:4x4x4 \
      --config.rl.seq_len=32768 --config.rl.batch_rows=64                          # an RL stage's update
With --topology (needs the [tpu] extra: libtpu) the real train step is compiled for that TPU topology from
this machine, with the configured mesh and shardings, and the compiled per-device memory, FLOPs and compile
seconds are added ("compiled"). An RL stage config (config.kind == "rl") compiles the RL loop's functions
instead (klong_jax/rl/aot.py compile_rl_update): `rl_update` (one optimizer step on a batch of
rl.batch_rows rows of rl.seq_len tokens, donated state, through the loop's jit wrapper), `old_logprobs` (the
forward pass(es) before the update; its `fits` counts the optimizer state that stays on device meanwhile) and,
with rl.minibatches > 0, `rl_grads`; --rl_functions picks a subset. Nothing is allocated either way.
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
                                  "old_logprobs, rl_grads to compile (default: rl_update, old_logprobs, and rl_grads "
                                  "when rl.minibatches > 0)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON here")


def main(_):
    cfg = _CONFIG.value
    result = {"config": cfg.get("variant", "")}
    if _TOPOLOGY.value:
        from klong_jax.rl.aot import compile_rl_update
        from klong_jax.training.aot import compile_train_step
        from jax.experimental import topologies
        n = len(topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices)
        result.update(plan(model_config_from(cfg.model), dict(cfg.mesh.shape), n))
        if cfg.get("kind") == "rl":
            result["compiled"] = compile_rl_update(cfg, _TOPOLOGY.value, functions=_RL_FUNCTIONS.value)
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
