"""Starting a sandbox's namespace holder with bubblewrap or, where it cannot start, with `unshare`.

A holder keeps one episode's namespaces (mount, pid, network, ipc, uts) alive between commands, so
background jobs survive from one command to the next; killing the holder kills every process of the
episode (pid-namespace teardown). Commands enter the holder's namespaces with launcher.py (see
sandbox.py). Both backends pivot into the view and detach the host's root (bubblewrap does it itself;
the fallback in fallback_init.py), so the host's file system is not in the sandbox's mount namespace.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from klong_jax.sandbox.view import ViewSpec, bwrap_view_args

log = logging.getLogger(__name__)

BACKENDS = ("bwrap", "unshare")
BACKEND_ENV = "KLONG_SANDBOX_BACKEND"  # "auto" (default), "bwrap" or "unshare"
# Which executables the backends use (default: found on PATH); pointing one at a missing file disables
# that backend, which is how tests exercise the fallback and the no-backend error.
BWRAP_ENV = "KLONG_SANDBOX_BWRAP"
UNSHARE_ENV = "KLONG_SANDBOX_UNSHARE"
_HOLDER_START_TIMEOUT_S = 20.0
_FALLBACK_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fallback_init.py")


class SandboxUnavailableError(RuntimeError):
    """No backend can confine commands on this host; commands are never run unconfined."""


class Holder:
    """A running namespace holder: `ns_pid` is the host pid of the namespace's init.

    The holder's stdin is a pipe that this process never writes to and that no other process inherits
    (CLOEXEC): the holder waits for EOF on it and then exits, tearing the namespace down. So a sandbox
    never outlives its owner, however the owner ends (even SIGKILL), and whichever thread made it."""

    def __init__(self, process: subprocess.Popen, ns_pid: int, backend: str):
        self.process = process
        self.ns_pid = ns_pid
        self.backend = backend
        self._pid_ns = _pid_namespace(ns_pid)  # identifies the init even if its pid is reused later

    @property
    def pid_ns(self) -> str | None:
        """The holder's pid namespace ("pid:[inode]"), as read when it started."""
        return self._pid_ns

    def alive(self) -> bool:
        return self.process.poll() is None and _pid_namespace(self.ns_pid) == self._pid_ns

    def kill(self) -> None:
        """SIGKILLs the namespace's init, upon which the kernel kills every process in the pid
        namespace, and the holder process itself."""
        if _pid_namespace(self.ns_pid) == self._pid_ns:
            try:
                os.kill(self.ns_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _executable(env_var: str, name: str) -> str:
    path = os.environ.get(env_var) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise SandboxUnavailableError(
            f"{name} is not installed (or ${env_var}={path!r} is not executable)")
    return path


def _host_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def start_bwrap(spec: ViewSpec) -> Holder:
    bwrap = _executable(BWRAP_ENV, "bwrap")
    info_r, info_w = os.pipe()
    # No --die-with-parent: it ties the sandbox to the *thread* that started bwrap (a parent-death
    # signal fires when that thread exits); the stdin pipe ends the sandbox with its owner instead.
    # --as-pid-1: the holder shell itself is the namespace's init, so its exit ends the namespace
    # (bubblewrap's own init would wait for the last background job); bash reaps orphans.
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--new-session", "--as-pid-1", "--info-fd", str(info_w),
            *bwrap_view_args(spec), "--chdir", "/", "--",
            # Prints once the view is complete (the info fd comes earlier, before the mounts), then
            # waits for EOF on stdin: see Holder.
            "/bin/bash", "-c", "echo ready; while read -r _; do :; done"]
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, pass_fds=(info_w,), start_new_session=True,
                                   env=_host_env())
    finally:
        os.close(info_w)
    with os.fdopen(info_r, "rb") as info:
        # bwrap writes the info document once the namespaces exist and closes the fd; EOF without
        # a document means it failed (the reason is on stderr).
        text = _read_with_timeout(info, process, "bwrap")
    try:
        ns_pid = int(json.loads(text)["child-pid"])
    except (ValueError, KeyError) as e:
        process.kill()
        err = process.communicate()[1].decode(errors="replace")
        raise SandboxUnavailableError(f"bwrap failed to start: {err.strip() or text!r}") from e
    ready = _read_with_timeout(process.stdout, process, "bwrap", line=True)
    if ready.strip() != "ready":
        process.kill()
        err = process.communicate()[1].decode(errors="replace")
        raise SandboxUnavailableError(f"bwrap failed to start: {err.strip() or ready!r}")
    process.stdout.close()
    return Holder(process, ns_pid, "bwrap")


def start_unshare(spec: ViewSpec, root_dir: str) -> Holder:
    unshare = _executable(UNSHARE_ENV, "unshare")
    argv = [unshare, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            "--propagation", "private", "--", sys.executable, "-I", "-S", _FALLBACK_INIT, root_dir,
            json.dumps(spec.to_json_dict())]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, env=_host_env())
    text = _read_with_timeout(process.stdout, process, "unshare fallback", line=True)
    if not text.startswith("ready "):
        process.kill()
        err = process.communicate()[1].decode(errors="replace")
        raise SandboxUnavailableError(f"unshare fallback failed to start: {err.strip() or text!r}")
    return Holder(process, int(text.split()[1]), "unshare")


def _read_with_timeout(stream, process: subprocess.Popen, what: str, line: bool = False) -> str:
    result: list[bytes] = []
    read = stream.readline if line else stream.read
    reader = threading.Thread(target=lambda: result.append(read()), daemon=True)
    reader.start()
    reader.join(_HOLDER_START_TIMEOUT_S)
    if reader.is_alive():
        process.kill()
        raise SandboxUnavailableError(f"{what} did not start within {_HOLDER_START_TIMEOUT_S}s")
    return (result[0] if result else b"").decode(errors="replace")


_probe_lock = threading.Lock()
# (backend, its executable override) -> None if it works, else the reason it does not.
_probe_results: dict[tuple[str, str], str | None] = {}
_warned_fallback = False


def _probe(backend: str) -> str | None:
    """Whether `backend` can start here: starts and kills a throwaway holder once per process."""
    key = (backend, os.environ.get(BWRAP_ENV if backend == "bwrap" else UNSHARE_ENV, ""))
    with _probe_lock:
        if key not in _probe_results:
            scratch = tempfile.mkdtemp(prefix="klong_sandbox_probe_")
            try:
                os.makedirs(os.path.join(scratch, "ep"))
                os.makedirs(os.path.join(scratch, "root"))
                for name in ("passwd", "group"):
                    shutil.copyfile(f"/etc/{name}", os.path.join(scratch, name))
                spec = ViewSpec(os.path.join(scratch, "ep"), 65534, 1 << 20, 1 << 20, (),
                                os.path.join(scratch, "passwd"), os.path.join(scratch, "group"))
                holder = (start_bwrap(spec) if backend == "bwrap"
                          else start_unshare(spec, os.path.join(scratch, "root")))
                holder.kill()
                _probe_results[key] = None
            except (SandboxUnavailableError, OSError) as e:
                _probe_results[key] = str(e)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return _probe_results[key]


def choose_backend(requested: str | None) -> str:
    """The backend to use: `requested`, else $KLONG_SANDBOX_BACKEND, else auto (bwrap, falling back to
    unshare with a warning logged once). An explicitly requested backend that cannot start is an
    error."""
    global _warned_fallback
    choice = requested or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(f"sandbox backend must be one of {BACKENDS} or 'auto', got {choice!r} "
                         f"(from {'the argument' if requested else '$' + BACKEND_ENV})")
    if os.geteuid() != 0:
        raise SandboxUnavailableError(
            "the sandbox must run as root: it runs each episode under its own unprivileged uid so that "
            "RLIMIT_NPROC binds and episodes cannot touch each other")
    if choice != "auto":
        reason = _probe(choice)
        if reason is not None:
            raise SandboxUnavailableError(f"sandbox backend {choice!r} cannot start: {reason}")
        return choice
    bwrap_reason = _probe("bwrap")
    if bwrap_reason is None:
        return "bwrap"
    unshare_reason = _probe("unshare")
    if unshare_reason is not None:
        raise SandboxUnavailableError(f"no sandbox backend can start: bwrap: {bwrap_reason}; "
                                      f"unshare: {unshare_reason}")
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("bubblewrap cannot start (%s); sandboxing with the unshare fallback", bwrap_reason)
    return "unshare"
