"""Sandbox: runs model-written shell commands for one episode, confined.

Isolation (both backends): own mount, pid, network (loopback only, no route out), ipc and uts
namespaces; a read-only view of the system directories; only the episode directory writable (plus a
private tmpfs /tmp); every command runs as the episode's own unprivileged uid with no capabilities and
no_new_privs, under rlimits (CPU time, address space, processes, file size, open files); wall-clock
timeouts per command (kills the command's process group) and per episode (kills every process of the
episode); output read incrementally and truncated with a marker.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from klong_jax.sandbox import backends, processes
from klong_jax.sandbox.limits import TIMEOUT_EXIT_CODE, CommandResult, SandboxLimits
from klong_jax.sandbox.output import BoundedOutput
from klong_jax.sandbox.uids import acquire_uid, lock_dir
from klong_jax.sandbox.view import (BASH, ENV, PRLIMIT, SETPRIV, ViewSpec, check_episode_dir,
                                    command_env, write_identity_files)


_CENSUS_INTERVAL_S = 1.0  # how often a running command's sandbox counts its processes
# How a command's output pump ended.
_EOF, _TIMED_OUT, _KILLED_BACKGROUND, _PROCESS_LIMIT = "eof", "timed_out", "killed_background", "nproc"


class SandboxClosedError(RuntimeError):
    pass


class Sandbox:
    """One episode's sandbox. Commands run with cwd = episode_dir, one bash per command; files and
    background jobs (started with output redirected, e.g. `nohup CMD > log 2>&1 &`) persist between
    commands until close() or the episode timeout.

    backend: "bwrap", "unshare" or None/"auto" (bwrap, else the unshare fallback with a warning;
      $KLONG_SANDBOX_BACKEND overrides None). Never runs unconfined: SandboxUnavailableError instead.
    extra_ro_paths: more host paths visible read-only at the same path (e.g. a Python installation).
    python: the interpreter run_python uses, as found inside the sandbox.
    env: extra environment variables of every command (the host environment never leaks in).
    """

    def __init__(self, episode_dir: str | os.PathLike, limits: SandboxLimits | None = None, *,
                 backend: str | None = None, extra_ro_paths: tuple[str, ...] | list[str] = (),
                 python: str = "python3", env: dict[str, str] | None = None):
        self.limits = limits or SandboxLimits()
        self.episode_dir = os.path.realpath(os.fspath(episode_dir))
        check_episode_dir(self.episode_dir)
        for path in extra_ro_paths:
            if not os.path.isabs(path) or not os.path.exists(path):
                raise ValueError(f"extra_ro_paths entry {path!r} must be an existing absolute path")
        self.backend = backends.choose_backend(backend)
        self.python = python
        self._lock = threading.Lock()
        self._closed = False
        self._holder: backends.Holder | None = None
        self._lease = acquire_uid()
        self.uid = self._lease.uid
        self._private_dir = tempfile.mkdtemp(prefix=f"{self.uid}.", dir=lock_dir())
        try:
            os.makedirs(self.episode_dir, exist_ok=True)
            processes.chown_tree(self.episode_dir, self.uid)
            passwd, group = write_identity_files(self._private_dir, self.uid, self.episode_dir)
            self._spec = ViewSpec(self.episode_dir, self.uid, self.limits.tmp_bytes,
                                  tuple(os.path.realpath(p) for p in extra_ro_paths), passwd, group)
            self._env = command_env(self._spec, env)
            self._start_holder()
        except BaseException:
            self._release()
            raise
        self._started = time.monotonic()
        self._episode_expired = False
        self._watchdog: threading.Timer | None = None
        if self.limits.episode_timeout_s is not None:
            self._watchdog = threading.Timer(self.limits.episode_timeout_s, self._expire_episode)
            self._watchdog.daemon = True
            self._watchdog.start()

    # ----------------------------------------------------------------------------------------------
    def run(self, command: str, timeout_s: float | None = None, stdin: str | bytes | None = None
            ) -> CommandResult:
        """Runs `command` with bash in the episode directory and returns what it did. Never raises for
        anything the command does; raises SandboxClosedError after close()."""
        if self._closed:
            raise SandboxClosedError(f"sandbox of {self.episode_dir} is closed")
        notes = []
        timeout = self.limits.command_timeout_s if timeout_s is None else float(timeout_s)
        remaining = self.episode_time_left()
        if remaining is not None and remaining <= 0:
            self._expire_episode()
            return CommandResult(TIMEOUT_EXIT_CODE, "[sandbox: episode time limit reached]\n", True,
                                 False, 0.0, ("episode time limit reached",))
        if remaining is not None and remaining < timeout:
            timeout = remaining
        notes += self._ensure_ready()
        started = time.monotonic()
        process = subprocess.Popen(self._command_argv(command), stdin=subprocess.PIPE if stdin is not None
                                   else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            threading.Thread(target=_feed_stdin, args=(process.stdin, data), daemon=True).start()
        output = BoundedOutput(self.limits.output_bytes)
        ending = self._pump(process, output, started + timeout)
        exit_code = _exit_code(process.wait())
        timed_out = ending == _TIMED_OUT
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
            expired = self._episode_expired or (self.episode_time_left() or 1.0) <= 0
            notes.append("episode time limit reached" if expired
                         else f"command timed out after {timeout:g}s; its processes were killed")
        if ending == _PROCESS_LIMIT:
            notes.append(_process_limit_note(self.limits.max_processes))
        if ending == _KILLED_BACKGROUND:
            notes.append("background processes still writing to this command's output were killed "
                         "(redirect their output, e.g. `nohup CMD > log 2>&1 &`, to keep them running)")
        notes += self._enforce_process_limit()
        text = output.text()
        for note in notes:
            text += ("" if not text or text.endswith("\n") else "\n") + f"[sandbox: {note}]\n"
        return CommandResult(exit_code, text, timed_out, output.truncated, time.monotonic() - started,
                             tuple(notes))

    def run_python(self, code: str, timeout_s: float | None = None) -> CommandResult:
        """The stateless python tool: runs `code` in a fresh interpreter (read from stdin)."""
        return self.run(f"exec {self.python} -", timeout_s=timeout_s, stdin=code)

    def episode_time_left(self) -> float | None:
        if self.limits.episode_timeout_s is None:
            return None
        return self.limits.episode_timeout_s - (time.monotonic() - self._started)

    def kill_all(self) -> None:
        """Kills every process of the episode; the next command starts a fresh namespace (files in the
        episode directory persist, the private /tmp does not)."""
        with self._lock:
            self._kill_holder()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        with self._lock:
            self._kill_holder()
        self._release()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    # ----------------------------------------------------------------------------------------------
    def _command_argv(self, command: str) -> list[str]:
        lim = self.limits
        return [
            shutil.which("nsenter") or "/usr/bin/nsenter", f"--target={self._holder.ns_pid}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--root",
            # Paths from here on resolve inside the sandbox's (read-only) view of /usr.
            SETPRIV, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            PRLIMIT, f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 5}", f"--as={lim.address_space_bytes}",
            f"--nproc={lim.max_processes}", f"--fsize={lim.file_size_bytes}",
            f"--nofile={lim.open_files}", "--core=0", "--",
            ENV, "-i", f"--chdir={self.episode_dir}", *[f"{k}={v}" for k, v in self._env.items()],
            BASH, "-c", command,
        ]

    def _pump(self, process: subprocess.Popen, output: BoundedOutput, deadline: float) -> str:
        """Reads output until EOF, the deadline, or the end of the grace period after the command's
        main process exited. Returns how it ended (_EOF, _TIMED_OUT, ...)."""
        fd = process.stdout.fileno()
        os.set_blocking(fd, False)
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        grace_deadline = None
        next_census = time.monotonic() + _CENSUS_INTERVAL_S
        saturated_censuses = 0
        try:
            while True:
                now = time.monotonic()
                if now >= next_census:
                    # A process table held full (a fork bomb that escaped the process group) would
                    # leave the command retrying fork until its timeout: end the episode's processes.
                    next_census = now + _CENSUS_INTERVAL_S
                    saturated = processes.count_uid(self.uid) >= self.limits.max_processes - 1
                    saturated_censuses = saturated_censuses + 1 if saturated else 0
                    if saturated_censuses >= 2:
                        self._kill_group(process)
                        self.kill_all()
                        self._drain_briefly(fd, output)
                        return _PROCESS_LIMIT
                if self._episode_expired or now >= deadline:
                    self._kill_group(process)
                    self._drain_briefly(fd, output)
                    return _TIMED_OUT
                if grace_deadline is None and process.poll() is not None:
                    grace_deadline = now + self.limits.drain_grace_s
                if grace_deadline is not None and now >= grace_deadline:
                    self._kill_group(process)
                    self._drain_briefly(fd, output)
                    return _KILLED_BACKGROUND
                wait = min(deadline, grace_deadline or deadline) - now
                if selector.select(timeout=min(wait, 0.1)):
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return _EOF
                    output.add(chunk)
        finally:
            selector.close()
            process.stdout.close()

    @staticmethod
    def _drain_briefly(fd: int, output: BoundedOutput) -> None:
        """After a kill, keeps what the killed processes had already written (up to 0.2 s)."""
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                return
            output.add(chunk)

    @staticmethod
    def _kill_group(process: subprocess.Popen, wait_s: float = 2.0) -> None:
        """SIGKILLs the command's process group (nsenter leads it) and waits (bounded) until its
        members are reaped, so the next command, and the process census, never see them."""
        deadline = time.monotonic() + wait_s
        try:
            os.killpg(process.pid, signal.SIGKILL)
            while time.monotonic() < deadline:
                process.poll()  # reaps nsenter, our own child
                time.sleep(0.005)
                os.killpg(process.pid, 0)  # raises once no member (not even a zombie) is left
        except ProcessLookupError:
            pass

    def _ensure_ready(self) -> list[str]:
        """Restarts the namespace if it died (or was killed); returns notes for the agent."""
        notes = []
        if processes.count_uid(self.uid) >= self.limits.max_processes - 1:
            notes += self._enforce_process_limit()
        with self._lock:
            if self._holder is None or not self._holder.alive():
                if self._holder is not None:
                    notes.append("the sandbox was restarted: earlier background processes and /tmp "
                                 "are gone")
                self._kill_holder()
                self._start_holder()
        return notes

    def _enforce_process_limit(self) -> list[str]:
        """Processes left behind that exhaust max_processes would make every later command fail
        (a fork bomb with redirected output): then all of the episode's processes are killed."""
        if processes.count_uid(self.uid) < self.limits.max_processes - 1:
            return []
        self.kill_all()
        return [_process_limit_note(self.limits.max_processes)]

    def _start_holder(self) -> None:
        if self.backend == "bwrap":
            self._holder = backends.start_bwrap(self._spec)
        else:
            root = tempfile.mkdtemp(prefix="root.", dir=self._private_dir)
            self._holder = backends.start_unshare(self._spec, root)

    def _kill_holder(self) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder = None
        # Every process of the episode runs as its uid; pid-namespace teardown has killed them, and this
        # catches any that are still on their way out before the uid is handed to another episode.
        processes.kill_uid(self.uid)

    def _expire_episode(self) -> None:
        self._episode_expired = True
        with self._lock:
            self._kill_holder()

    def _release(self) -> None:
        processes.kill_uid(self.uid)
        self._lease.release()
        shutil.rmtree(self._private_dir, ignore_errors=True)


def _feed_stdin(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _process_limit_note(max_processes: int) -> str:
    return (f"the episode reached its limit of {max_processes} processes (threads count); all of its "
            f"processes were killed")


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode
