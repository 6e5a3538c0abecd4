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

from klong_jax.sandbox import backends, monitor, processes
from klong_jax.sandbox.limits import MIB, TIMEOUT_EXIT_CODE, CommandResult, SandboxLimits
from klong_jax.sandbox.output import BoundedOutput
from klong_jax.sandbox.uids import acquire_uid, lock_dir
from klong_jax.sandbox.view import (BASH, ENV, PRLIMIT, SETPRIV, SETSID, ViewSpec, check_episode_dir,
                                    command_env, write_identity_files)


_NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
# How a command's output pump ended.
_EOF, _TIMED_OUT, _KILLED_BACKGROUND = "eof", "timed_out", "killed_background"
# Consecutive monitor samples at max_processes after which all of an episode's processes are killed.
_SATURATED_SAMPLES = 2
# How often the monitor measures the episode directory against limits.disk_bytes.
_DISK_CHECK_S = 2.0


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
            ro_paths = tuple(os.path.realpath(p) for p in extra_ro_paths)
            self._spec = ViewSpec(self.episode_dir, self.uid, self.limits.tmp_bytes,
                                  self.limits.shm_bytes, ro_paths, passwd, group)
            self._env = command_env(self._spec, env)
            self._start_holder()
        except BaseException:
            self._release()
            raise
        self._started = time.monotonic()
        self._episode_expired = False
        self._saturated_samples = 0
        # Measured once now, so that only growth past the limit ends processes (not a large task setup).
        self._disk_checked_at = self._started
        self._disk_used = processes.tree_bytes(self.episode_dir) if self.limits.disk_bytes else 0
        self._pending_notes: list[str] = []
        monitor.MONITOR.register(self)

    # ----------------------------------------------------------------------------------------------
    def run(self, command: str, timeout_s: float | None = None, stdin: str | bytes | None = None
            ) -> CommandResult:
        """Runs `command` with bash in the episode directory and returns what it did. Never raises for
        anything the command does; raises SandboxClosedError after close(), and
        SandboxUnavailableError if the sandbox cannot be restarted."""
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
        process = subprocess.Popen(
            self._command_argv(command), stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            threading.Thread(target=_feed_stdin, args=(process.stdin, data), daemon=True).start()
        output = BoundedOutput(self.limits.output_bytes)
        leader = _child_of(process)
        ending = self._pump(process, leader, output, started + timeout)
        exit_code = _exit_code(process.wait())
        timed_out = ending == _TIMED_OUT
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
            expired = self._episode_expired or (self.episode_time_left() or 1.0) <= 0
            if expired:
                self._expire_episode()  # returns once every process of the episode is gone
            notes.append("episode time limit reached" if expired
                         else f"command timed out after {timeout:g}s; its processes were killed")
        if ending == _KILLED_BACKGROUND:
            notes.append("background processes still writing to this command's output were killed "
                         "(redirect their output, e.g. `nohup CMD > log 2>&1 &`, to keep them running)")
        notes += self._take_pending_notes()
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
        monitor.MONITOR.unregister(self)
        with self._lock:
            self._kill_holder()
        self._release()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A sandbox dropped without close(): kill its processes. At interpreter exit the modules
        # this needs may already be gone; the kernel then ends the namespaces with their holders.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    # ----------------------------------------------------------------------------------------------
    def _command_argv(self, command: str) -> list[str]:
        lim = self.limits
        return [
            _NSENTER, f"--target={self._holder.ns_pid}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--root",
            # Paths from here on resolve inside the sandbox's (read-only) view of /usr. setsid makes
            # the command's shell (nsenter's child) lead its own process group, so the command can be
            # killed with one atomic killpg that spares nsenter (see _kill_group).
            SETSID, SETPRIV, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            PRLIMIT, f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 5}",
            f"--as={lim.address_space_bytes}", f"--nproc={lim.max_processes}",
            f"--fsize={lim.file_size_bytes}",
            f"--nofile={lim.open_files}", "--core=0", "--",
            ENV, "-i", f"--chdir={self.episode_dir}", *[f"{k}={v}" for k, v in self._env.items()],
            BASH, "-c", command,
        ]

    def _pump(self, process: subprocess.Popen, leader: int | None, output: BoundedOutput,
              deadline: float) -> str:
        """Reads output until EOF, the deadline, or the end of the grace period after the command's
        main process exited. Returns how it ended (_EOF, _TIMED_OUT, ...)."""
        fd = process.stdout.fileno()
        os.set_blocking(fd, False)
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        grace_deadline = None
        try:
            while True:
                now = time.monotonic()
                if self._episode_expired or now >= deadline:
                    self._kill_group(process, leader)
                    self._drain_briefly(fd, output)
                    return _TIMED_OUT
                if grace_deadline is None and process.poll() is not None:
                    grace_deadline = now + self.limits.drain_grace_s
                if grace_deadline is not None and now >= grace_deadline:
                    self._kill_group(process, leader)
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

    def _kill_group(self, process: subprocess.Popen, leader: int | None, wait_s: float = 2.0
                    ) -> None:
        """Kills the command's processes: the process group led by the command's shell.

        nsenter (outside that group) stays alive to reap its child: were nsenter killed first, the
        shell would be re-parented to the host's init, which may never reap it, and a zombie still
        counts against the uid's process limit. killpg is atomic, so even a fork bomb cannot outrun it.
        Other members are re-parented inside the sandbox and reaped by its init; this waits (bounded)
        until they are gone, so the next command and the process census never see them."""
        deadline = time.monotonic() + wait_s
        # Only a group with members of this sandbox's uid is ours to kill (never a reused pgid).
        if leader is not None and processes.group_members(self.uid, leader):
            try:
                os.killpg(leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while processes.group_members(self.uid, leader) and time.monotonic() < deadline:
                time.sleep(0.002)
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def _ensure_ready(self) -> list[str]:
        """Restarts the namespace if it died (or was killed); returns notes for the agent."""
        notes = self._take_pending_notes()
        if processes.count_uid(self.uid) >= self.limits.max_processes - 1:
            # This command could not even start: free the process table now.
            self.kill_all()
            notes.append(_process_limit_note(self.limits.max_processes))
        with self._lock:
            if self._holder is None or not self._holder.alive():
                if self._holder is not None:
                    notes.append("the sandbox was restarted: earlier background processes and /tmp "
                                 "are gone")
                self._kill_holder()
                self._start_holder()
        return notes

    def _monitor_tick(self, tasks: int, now: float) -> None:
        """Called about once a second by the monitor thread with the episode's live task count."""
        if self._closed:
            return
        if self.limits.episode_timeout_s is not None and not self._episode_expired and \
                now - self._started >= self.limits.episode_timeout_s:
            self._expire_episode()
            return
        self._saturated_samples = self._saturated_samples + 1 if \
            tasks >= self.limits.max_processes - 1 else 0
        if self._saturated_samples >= _SATURATED_SAMPLES:
            self._saturated_samples = 0
            # The note goes in before the kill: a command that the kill ends collects its notes as soon
            # as its output closes, which can be before kill_all() returns.
            with self._lock:
                self._pending_notes.append(_process_limit_note(self.limits.max_processes))
            self.kill_all()
        if self.limits.disk_bytes is not None and now - self._disk_checked_at >= _DISK_CHECK_S:
            self._check_disk(now)

    def _check_disk(self, now: float) -> None:
        """Kills the episode's processes while its directory is above limits.disk_bytes and not shrinking:
        a command that deletes files to get back under the limit is left to finish."""
        limit = self.limits.disk_bytes
        used = processes.tree_bytes(self.episode_dir, stop_above=2 * limit)
        growing = used > self._disk_used
        self._disk_checked_at, self._disk_used = now, used
        if used > limit and growing:
            with self._lock:
                self._pending_notes.append(
                    f"the episode directory holds over {used / MIB:.1f} MiB, above its disk limit of "
                    f"{limit / MIB:.1f} MiB; all of its processes were killed (files are kept: delete some "
                    f"to go on)")
            self.kill_all()
            # The baseline is what is left once the writers are dead: what they wrote between the measure
            # and the kill must not count as growth against the next command.
            self._disk_used = processes.tree_bytes(self.episode_dir, stop_above=2 * limit)

    def _take_pending_notes(self) -> list[str]:
        with self._lock:
            notes, self._pending_notes = self._pending_notes, []
        return notes

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


def _child_of(process: subprocess.Popen, wait_s: float = 1.0) -> int | None:
    """Host pid of nsenter's child (the command's shell, its process group leader); None if nsenter
    exited without one. nsenter forks within milliseconds of starting."""
    path = f"/proc/{process.pid}/task/{process.pid}/children"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                children = f.read().split()
        except FileNotFoundError:
            return None
        if children:
            return int(children[0])
        if process.poll() is not None:
            return None
        time.sleep(0.0005)
    return None


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
