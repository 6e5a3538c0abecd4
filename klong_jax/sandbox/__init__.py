"""Confined execution of model-written commands (imports no JAX; needs root and bubblewrap, else
falls back to `unshare`; never runs anything unconfined).

    from klong_jax.sandbox import Sandbox, SandboxLimits, SandboxPool, host_python
    with Sandbox("/path/to/episode", limits=SandboxLimits(command_timeout_s=60)) as sb:
        res = sb.run("python3 train.py", timeout_s=None, stdin=None)   # a CommandResult
        res.exit_code, res.output, res.timed_out, res.truncated, res.wall_s, res.notes
        sb.run_python("print(1 + 1)")             # the stateless python tool
        sb.backend                                # "bwrap" | "unshare"
    paths, python = host_python()                 # this interpreter + its venv, read-only inside
    Sandbox(episode_dir, extra_ro_paths=paths, python=python)
    pool = SandboxPool(max_concurrent=8, limits=...)
    with pool.episode("/path/to/episode") as sb: ...

Semantics: cwd is the episode directory (the only writable host path; it and its files are chowned to
the episode's private uid); each run() is a fresh `bash -c`; files and background jobs whose output is
redirected (`nohup CMD > log 2>&1 &`) persist until close() or the episode timeout; if anything the
command started is still attached to its output drain_grace_s after its shell exits, every process the
command started is killed (with cgroups; else its process group).
exit_code is 124 on a timeout and 128+N when killed by signal N; a timeout kills every process the
command started (setsid included, via its cgroup); sandbox events (timeouts, restarts, the process,
memory and disk limits) are appended to `output` as `[sandbox: ...]` lines and listed in `notes`.
Per episode: memory_bytes and max_processes cap all its processes together (cgroups), disk_bytes is a
size-limited file system on the episode directory; every command runs under a seccomp filter (no
ptrace, no kernel keyring, no mounts or namespaces) as a uid no earlier episode of this process had.
A sandbox whose owner died without close() is cleaned up by the next Sandbox() on the host (its
processes, cgroups, mounts, loop device; its files copied back): sweep_stale(), at most once a minute
per process.
$KLONG_SANDBOX_BACKEND=bwrap|unshare|auto picks the backend (see backends.py).
"""
from klong_jax.sandbox.backends import BACKEND_ENV, SandboxUnavailableError
from klong_jax.sandbox.limits import TIMEOUT_EXIT_CODE, CommandResult, SandboxLimits
from klong_jax.sandbox.pool import SandboxPool
from klong_jax.sandbox.sandbox import Sandbox, SandboxClosedError, sweep_stale
from klong_jax.sandbox.view import host_python

__all__ = ["BACKEND_ENV", "TIMEOUT_EXIT_CODE", "CommandResult", "Sandbox", "SandboxClosedError",
           "SandboxLimits", "SandboxPool", "SandboxUnavailableError", "host_python", "sweep_stale"]
