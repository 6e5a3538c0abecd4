"""Convert checkpoints between Hugging Face safetensors and Orbax.

  python launch/convert.py --direction=hf_to_orbax --src=HF_DIR --dst=ORBAX_DIR [--mesh=fsdp:-1]
  python launch/convert.py --direction=orbax_to_hf --src=ORBAX_DIR --dst=HF_DIR [--dtype=bfloat16]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from launch.cli import parse_mesh_flag  # noqa: E402

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "which way")
_SRC = flags.DEFINE_string("src", None, "source directory")
_DST = flags.DEFINE_string("dst", None, "destination directory")
_MESH = flags.DEFINE_string("mesh", "fsdp:-1", "mesh as axis:size,... over all devices")
_DTYPE = flags.DEFINE_string("dtype", None, "HF output dtype (default: the parameter dtype)")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "emulated CPU devices (0: leave as is)")


def main(_):
    from klong_jax.runtime import setup_devices
    setup_devices(_CPU_DEVICES.value)
    from klong_jax.hf import load_pretrained, save_pretrained
    from klong_jax.model_checkpoint import load_model, save_model
    from klong_jax.sharding import make_mesh

    mesh = make_mesh(parse_mesh_flag(_MESH.value))
    t0 = time.time()
    if _DIRECTION.value == "hf_to_orbax":
        model = load_pretrained(_SRC.value, mesh=mesh)
        save_model(model, _DST.value)
    else:
        model = load_model(_SRC.value, mesh)
        save_pretrained(model, _DST.value, dtype=_DTYPE.value)
    logging.info("converted %s -> %s (%s) in %.1fs", _SRC.value, _DST.value, _DIRECTION.value, time.time() - t0)
    print(f"converted {_SRC.value} -> {_DST.value} ({_DIRECTION.value}) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    flags.mark_flags_as_required(["direction", "src", "dst"])
    app.run(main)
