"""Confined execution of model-written commands (imports no JAX).

    from klong_jax.sandbox import Sandbox, SandboxLimits
    with Sandbox("/path/to/episode", limits=SandboxLimits(command_timeout_s=60)) as sb:
        res = sb.run("python3 train.py")          # CommandResult
        res.exit_code, res.output, res.timed_out, res.truncated, res.wall_s
        sb.run_python("print(1 + 1)")             # the stateless python tool
    pool = SandboxPool(max_concurrent=8, limits=...)
    with pool.episode("/path/to/episode") as sb: ...
"""
from klong_jax.sandbox.backends import BACKEND_ENV, SandboxUnavailableError
from klong_jax.sandbox.limits import TIMEOUT_EXIT_CODE, CommandResult, SandboxLimits
from klong_jax.sandbox.pool import SandboxPool
from klong_jax.sandbox.sandbox import Sandbox, SandboxClosedError

__all__ = ["BACKEND_ENV", "TIMEOUT_EXIT_CODE", "CommandResult", "Sandbox", "SandboxClosedError",
           "SandboxLimits", "SandboxPool", "SandboxUnavailableError"]
