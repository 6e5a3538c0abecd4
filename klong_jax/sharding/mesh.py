"""Meshes from config: `{"fsdp": -1, "tensor": 2}` on any device count, single- or multi-host."""
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from klong_jax.sharding.rules import MESH_AXES


def resolve_mesh_shape(shape: dict, num_devices: int) -> dict[str, int]:
    """Fill one -1 entry so the product equals num_devices; every named axis exists (default 1)."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}")
    full = {ax: int(shape.get(ax, 1)) for ax in MESH_AXES}
    free = [ax for ax, n in full.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(n for n in full.values() if n != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices not divisible by {known}")
        full[free[0]] = num_devices // known
    if math.prod(full.values()) != num_devices:
        raise ValueError(f"mesh {full} needs {math.prod(full.values())} devices, have {num_devices}")
    return full


def make_mesh(shape: dict, devices=None) -> Mesh:
    """A Mesh over all global devices (all processes) with the project's fixed axis order.

    The order puts `tensor` innermost so tensor-parallel collectives stay on the fastest links.
    """
    devices = jax.devices() if devices is None else devices
    full = resolve_mesh_shape(shape, len(devices))
    dims = tuple(full[ax] for ax in MESH_AXES)
    if devices is jax.devices() or list(devices) == list(jax.devices()):
        try:
            return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
        except Exception:  # noqa: BLE001 - fall back to plain ordering on unusual topologies
            pass
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_spec(text: str) -> dict[str, int]:
    """'fsdp:2,tensor:4' -> {'fsdp': 2, 'tensor': 4}: the --mesh flag of the launchers."""
    try:
        return {k: int(v) for k, v in (item.split(":") for item in text.split(",") if item)}
    except ValueError:
        raise ValueError(f"--mesh={text!r}: expected axis:size[,axis:size...]") from None
