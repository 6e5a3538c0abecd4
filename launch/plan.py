"""Plan a run without allocating: parameter counts and per-device memory on a mesh, as one JSON object.

  python launch/plan.py --config=configs/sft.py:glm45_air --num_devices=256
  python launch/plan.py --config=configs/sft.py:glm45_air --topology=v5p:4x4x8   # AOT-compile the step
With --topology (needs the [tpu] extra: libtpu) the real train step is compiled for that TPU topology from
this machine, with the configured mesh and shardings, and the compiled per-device memory and FLOPs are
added. Nothing is allocated either way.
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
_OUT = flags.DEFINE_string("out", "", "also write the JSON here")


def main(_):
    cfg = _CONFIG.value
    result = {"config": cfg.get("variant", "")}
    if _TOPOLOGY.value:
        from klong_jax.training.aot import compile_train_step
        from jax.experimental import topologies
        n = len(topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices)
        result.update(plan(model_config_from(cfg.model), dict(cfg.mesh.shape), n))
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
