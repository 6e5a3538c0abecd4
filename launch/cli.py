"""Command-line pieces shared by the launchers (absl flags in, usage errors out)."""
from absl import app


def parse_mesh_flag(text: str) -> dict:
    """`--mesh=axis:size,...` as a mesh shape; a bad spec is a usage error (absl prints it with the usage)."""
    from klong_jax.sharding.mesh import parse_mesh_spec
    try:
        return parse_mesh_spec(text)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
