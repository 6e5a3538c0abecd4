"""Trajectory-splitting SFT. Variants: tiny (CPU, minutes), small (benchmarks), glm45_air (TPU pods).

  python launch/train.py --config=configs/sft.py:tiny --config.model.remat_policy=full
Every value below can be overridden from the command line; the SFT trainer issue adds the
optimizer, data and checkpoint sections.
"""
import dataclasses

from ml_collections import ConfigDict

from klong_jax.models.config import preset

MESHES = {
    # 8 emulated CPU devices by default; -1 takes whatever devices exist.
    "tiny": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    "small": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    # Experts over 8 devices (16 experts each), everything else FSDP.
    "glm45_air": {"data": 1, "fsdp": -1, "expert": 8, "context": 1, "tensor": 1},
}

RUNTIME = {
    "tiny": dict(dtype="float32", param_dtype="float32"),
    "small": dict(dtype="bfloat16", param_dtype="float32"),
    "glm45_air": dict(dtype="bfloat16", param_dtype="float32", remat_policy="full",
                      attention_impl="pallas"),
}


def model_section(variant: str) -> ConfigDict:
    fields = dataclasses.asdict(preset(variant, **RUNTIME[variant]))
    return ConfigDict(fields)


def get_config(variant: str = "tiny") -> ConfigDict:
    if variant not in MESHES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(MESHES)}")
    c = ConfigDict()
    c.variant = variant
    c.seed = 0
    c.model = model_section(variant)
    c.mesh = ConfigDict({"shape": MESHES[variant]})
    c.cpu_devices = 8  # emulated devices when running on CPU
    c.init_from = ""   # a Hugging Face directory or an Orbax checkpoint
    c.seq_len = 256 if variant == "tiny" else 4096 if variant == "small" else 32768
    c.global_batch = 8 if variant != "glm45_air" else 256
    c.optimizer = ConfigDict(dict(lr=3e-4, b1=0.9, b2=0.95, weight_decay=0.1))
    return c
