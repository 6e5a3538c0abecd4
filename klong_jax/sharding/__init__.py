"""Named meshes and logical-axis sharding rules."""
from klong_jax.sharding.mesh import make_mesh, resolve_mesh_shape
from klong_jax.sharding.rules import (DEFAULT_RULES, MESH_AXES, active_rules, constrain, logical_to_spec,
                                      set_rules, state_shardings, variable_axes)

__all__ = ["make_mesh", "resolve_mesh_shape", "DEFAULT_RULES", "MESH_AXES", "active_rules", "constrain",
           "logical_to_spec", "set_rules", "state_shardings", "variable_axes"]
