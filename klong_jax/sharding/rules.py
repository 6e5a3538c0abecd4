"""Logical axis names -> mesh axes: the one place where the model's names meet the physical mesh.

Parameters and key activations carry logical axis names (metadata `logical_axes` on every nnx.Variable;
`constrain(x, names)` on activations). A rule maps a logical name to one mesh axis, a tuple of mesh
axes, or None (replicated). A mesh axis is used at most once per array, and an axis whose size does not
divide the dimension is dropped (that dimension is then replicated over it) rather than failing, so one
rule set serves every preset from tiny to glm45_air.
"""
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),   # the expert axis acts as data parallelism outside MoE
    ("seq", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),  # non-expert weights also spread over the expert axis
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
)


def _mesh_axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def logical_to_spec(logical_axes, shape, mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims carry `logical_axes` names."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    table = dict(rules)
    sizes = _mesh_axis_sizes(mesh)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for ax in axes:
            if ax not in sizes or ax in used or sizes[ax] == 1:
                continue
            if dim % (math.prod(sizes[a] for a in chosen) * sizes[ax]) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def variable_axes(variable) -> tuple:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"variable {type(variable).__name__} of shape {variable.shape} has no logical_axes")
    return tuple(axes)


def state_shardings(state, mesh, rules=DEFAULT_RULES):
    """NamedShardings for an nnx State (abstract or concrete), from each Variable's logical_axes."""
    import flax.nnx as nnx

    def one(v):
        return NamedSharding(mesh, logical_to_spec(variable_axes(v), v.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE_RULES = [DEFAULT_RULES]


def set_rules(rules) -> None:
    """Replace the activation rules used by `constrain` (parameters take rules explicitly)."""
    _ACTIVE_RULES[0] = tuple(rules)


def active_rules():
    return _ACTIVE_RULES[0]


def constrain(x, logical_axes):
    """with_sharding_constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, active_rules()))
