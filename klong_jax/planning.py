"""Static memory planning: bytes per device of parameters and optimizer state on a mesh, without
allocating anything (shapes from `jax.eval_shape`, shardings from the logical-axis rules)."""
import math

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from klong_jax.models.config import ModelConfig
from klong_jax.models.init import abstract_model, count_params
from klong_jax.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec, resolve_mesh_shape, variable_axes


def abstract_mesh(shape: dict, num_devices: int) -> AbstractMesh:
    full = resolve_mesh_shape(shape, num_devices)
    return AbstractMesh(tuple(full[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _shard_elems(shape, spec, sizes) -> int:
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return n


def plan(cfg: ModelConfig, mesh_shape: dict, num_devices: int, rules=DEFAULT_RULES,
         optimizer_states_per_param: int = 2, optimizer_dtype: str | None = None) -> dict:
    """Parameter counts and the largest per-device bytes of params and (Adam-style) optimizer state."""
    mesh = abstract_mesh(mesh_shape, num_devices)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    _, state = nnx.split(abstract_model(cfg))
    param_bytes = opt_bytes = 0
    for path, var in nnx.to_flat_state(state):
        spec = logical_to_spec(variable_axes(var), var.shape, mesh, rules)
        elems = _shard_elems(var.shape, spec, sizes)
        itemsize = jnp.dtype(var.dtype).itemsize
        param_bytes += elems * itemsize
        if isinstance(var, nnx.Param):
            opt_item = jnp.dtype(optimizer_dtype).itemsize if optimizer_dtype else itemsize
            opt_bytes += elems * opt_item * optimizer_states_per_param
    counts = count_params(cfg)
    return {
        **counts,
        "total_params_billions": round(counts["total_params"] / 1e9, 3),
        "active_params_per_token_billions": round(counts["active_params_per_token"] / 1e9, 3),
        "mesh": dict(sizes),
        "num_devices": num_devices,
        "bytes_per_device": {
            "params": param_bytes,
            "optimizer_state": opt_bytes,
            "params_plus_optimizer": param_bytes + opt_bytes,
            "params_plus_optimizer_gib": round((param_bytes + opt_bytes) / 2**30, 3),
        },
    }
