"""Convert checkpoints: Hugging Face safetensors <-> Orbax, and llama GGUF files -> Orbax or Hugging Face.

  python launch/convert.py --direction=hf_to_orbax --src=HF_DIR --dst=ORBAX_DIR [--mesh=fsdp:-1]
  python launch/convert.py --direction=orbax_to_hf --src=ORBAX_DIR --dst=HF_DIR [--dtype=bfloat16]
  python launch/convert.py --direction=gguf_to_orbax --src=FILE.gguf --dst=ORBAX_DIR
  python launch/convert.py --direction=gguf_to_hf --src=FILE.gguf --dst=HF_DIR [--dtype=bfloat16]

For the gguf directions --src may also name a registered pretrained base (e.g. smollm2-135m-instruct,
klong_jax/hf/pretrained.py), which is fetched into the cache first. GGUF weights are dequantized to float32
(--param_dtype changes the storage dtype); the HF output is a LlamaForCausalLM directory that transformers
loads. Prints the load, save and total times.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from launch.cli import parse_mesh_flag  # noqa: E402

DIRECTIONS = ["hf_to_orbax", "orbax_to_hf", "gguf_to_orbax", "gguf_to_hf"]
_DIRECTION = flags.DEFINE_enum("direction", None, DIRECTIONS, "which way")
_SRC = flags.DEFINE_string("src", None, "source directory, .gguf file, or (gguf_*) a pretrained base name")
_DST = flags.DEFINE_string("dst", None, "destination directory")
_MESH = flags.DEFINE_string("mesh", "fsdp:-1", "mesh as axis:size,... over all devices")
_DTYPE = flags.DEFINE_string("dtype", None, "HF output dtype (default: the parameter dtype)")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", None, "parameter storage dtype on load (default float32 / as saved)")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "emulated CPU devices (0: leave as is)")


def resolve_gguf_source(src: str) -> str:
    """A .gguf path as given, or the fetched file of a registered pretrained base."""
    from klong_jax.hf.pretrained import REGISTRY, FetchError, fetch
    if os.path.exists(src) or src not in REGISTRY:
        if not os.path.isfile(src):
            raise app.UsageError(f"--src={src}: no such GGUF file, nor a pretrained base ({sorted(REGISTRY)})")
        return src
    try:
        return fetch(src)
    except FetchError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from klong_jax.runtime import setup_devices
    setup_devices(_CPU_DEVICES.value)
    from klong_jax.hf import load_pretrained, save_pretrained
    from klong_jax.hf.gguf import load_gguf
    from klong_jax.model_checkpoint import load_model, save_model
    from klong_jax.sharding import make_mesh

    direction, src, dst = _DIRECTION.value, _SRC.value, _DST.value
    mesh = make_mesh(parse_mesh_flag(_MESH.value))
    t0 = time.time()
    if direction.startswith("gguf_"):
        src = resolve_gguf_source(src)
        model = load_gguf(src, mesh=mesh, param_dtype=_PARAM_DTYPE.value)
    elif direction == "hf_to_orbax":
        model = load_pretrained(src, mesh=mesh, param_dtype=_PARAM_DTYPE.value)
    else:
        model = load_model(src, mesh, param_dtype=_PARAM_DTYPE.value)
    t1 = time.time()
    if direction.endswith("_orbax"):
        save_model(model, dst)
    else:
        save_pretrained(model, dst, save_dtype=_DTYPE.value)
    t2 = time.time()
    line = (f"converted {src} -> {dst} ({direction}) in {t2 - t0:.1f}s (load {t1 - t0:.1f}s, save {t2 - t1:.1f}s; "
            f"mesh {({k: v for k, v in mesh.shape.items() if v > 1}) or '1 device'})")
    logging.info(line)
    print(line)


if __name__ == "__main__":
    flags.mark_flags_as_required(["direction", "src", "dst"])
    app.run(main)
