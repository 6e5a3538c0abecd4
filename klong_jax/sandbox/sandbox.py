"""Sandbox: runs model-written shell commands for one episode, confined.

Isolation (both backends): own mount, pid, network (loopback only, no route out), ipc and uts
namespaces; a view of the system directories, read-only, entered with pivot_root (the host's file system
is not in the sandbox's mount namespace); only the episode directory writable (plus a private tmpfs
/tmp); every command is started by launcher.py, which sets the rlimits (CPU time, address space,
processes, file size, open files), empties the capability bounding set and sets no_new_privs while still
root, then switches to the episode's own unprivileged uid (a fresh one per episode), and installs a
seccomp filter (no ptrace, no kernel keyring, no mounts or namespaces; see seccomp.py) just before the
command runs. Per episode, cgroups cap the memory and the tasks of all its processes together, and each
command gets its own cgroup, so a timeout kills everything the command started (setsid included); the
disk limit is a size-limited file system on the episode directory (disk.py), copied back at close()
without growing (hard links and holes kept). What a sandbox whose owner died without close() left
(mounts, loop device, cgroups, files) is cleaned up by sweep_stale(), which Sandbox() runs now and then.
Wall-clock timeouts per command and per episode (kills every process of the episode); output read
incrementally and truncated with a marker. Where the host lacks cgroups or loop devices, a warning says
so once and what is used instead.
"""
from __future__ import annotations

import logging
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from klong_jax.sandbox import backends, cgroups, disk, monitor, processes, seccomp, spawner
from klong_jax.sandbox.limits import MIB, TIMEOUT_EXIT_CODE, CommandResult, SandboxLimits
from klong_jax.sandbox.output import BoundedOutput
from klong_jax.sandbox.uids import acquire_uid, lock_dir, try_acquire
from klong_jax.sandbox.view import BASH, ViewSpec, check_episode_dir, command_env, write_identity_files

log = logging.getLogger(__name__)
# How a command's output pump ended.
_EOF, _TIMED_OUT, _KILLED_BACKGROUND = "eof", "timed_out", "killed_background"
# Consecutive monitor samples at max_processes after which all of an episode's processes are killed.
_SATURATED_SAMPLES = 2
# How often the monitor measures the episode directory against limits.disk_bytes (only where the
# size-limited file system is unavailable).
_DISK_CHECK_S = 2.0
_seccomp_bytes: bytes | None = None
_cap_last_cap: int | None = None
# How often (at most) creating a sandbox sweeps what sandboxes of dead owners left behind.
SWEEP_INTERVAL_S = 60.0
_sweep_lock = threading.Lock()
_last_sweep: float | None = None


def sweep_stale() -> int:
    """Cleans up after sandboxes whose owning process died without close() (SIGKILL, OOM kill, power
    loss of a trainer), so that an RL run that restarts its trainers never accumulates them: for each
    private directory under the lock dir whose uid no live sandbox holds (checked with the uid's lock,
    which the kernel drops when its holder dies), kills any process left of that uid, copies the files
    of a still-mounted episode file system back into its episode directory and unmounts it (freeing its
    loop device), and deletes the directory; then removes the empty cgroups of dead owners. Sandboxes
    that are alive, in any process, are never touched. Returns how many private directories it removed.
    Sandbox() runs it at most every SWEEP_INTERVAL_S seconds per process."""
    directory = lock_dir()
    removed = 0
    for name in os.listdir(directory):
        uid_text, dot, _ = name.partition(".")
        path = os.path.join(directory, name)
        if not dot or not uid_text.isdigit() or name.endswith(".lock") or not os.path.isdir(path):
            continue
        try:
            lease = try_acquire(int(uid_text), directory)
        except OSError as e:
            log.warning("sandbox: cannot check whether %s is stale: %s", path, e)
            continue
        if lease is None:  # a live sandbox's
            continue
        try:
            processes.kill_uid(lease.uid)
            disk.recover_stale(path)
            original = os.path.join(path, disk.ORIGINAL)
            if disk.is_mount_point(original):  # never delete through a mount of an episode directory
                log.warning("sandbox: %s could not be unmounted; leaving %s in place (umount it by "
                            "hand)", original, path)
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        except (OSError, RuntimeError) as e:
            log.warning("sandbox: cleaning up after the dead sandbox in %s failed: %s", path, e)
        finally:
            lease.release()
    cgroups.sweep_stale()
    return removed


def _sweep_now_and_then() -> None:
    global _last_sweep
    with _sweep_lock:
        now = time.monotonic()
        if _last_sweep is not None and now - _last_sweep < SWEEP_INTERVAL_S:
            return
        _last_sweep = now
    try:
        sweep_stale()
    except OSError as e:  # cleaning up after others must never keep this sandbox from starting
        log.warning("sandbox: sweeping the leftovers of dead sandboxes failed: %s", e)


def _seccomp_program() -> bytes:
    """The seccomp filter, built once; an architecture without syscall numbers is refused."""
    global _seccomp_bytes
    if _seccomp_bytes is None:
        try:
            _seccomp_bytes = seccomp.filter_program()
        except seccomp.SeccompUnsupportedError as e:
            raise backends.SandboxUnavailableError(str(e)) from e
    return _seccomp_bytes


def _last_capability() -> int:
    global _cap_last_cap
    if _cap_last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _cap_last_cap = int(f.read())
        except (OSError, ValueError):
            _cap_last_cap = 63  # dropping capabilities the kernel does not have is harmless
    return _cap_last_cap


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
        self._seccomp = _seccomp_program()
        self.python = python
        self._lock = threading.Lock()
        self._closed = False
        self._holder: backends.Holder | None = None
        self._spawner: spawner.Spawner | None = None
        self._cgroups: cgroups.EpisodeCgroups | None = None
        self._disk: disk.EpisodeDisk | None = None
        _sweep_now_and_then()
        self._lease = acquire_uid()
        self.uid = self._lease.uid
        self._private_dir = tempfile.mkdtemp(prefix=f"{self.uid}.", dir=lock_dir())
        try:
            os.makedirs(self.episode_dir, exist_ok=True)
            if self.limits.disk_bytes is not None:
                try:
                    self._disk = disk.EpisodeDisk.attach(self.episode_dir, self._private_dir,
                                                         self.limits.disk_bytes)
                except disk.DiskLimitUnavailable as e:
                    disk.warn_unavailable_once(str(e))
            self._cgroups = cgroups.EpisodeCgroups.create(
                f"{self.uid}-{os.getpid()}-{secrets.token_hex(4)}", self.limits.memory_bytes,
                self.limits.max_processes + cgroups.HELPER_TASKS)
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
        # The polling fallback of the disk limit: measured once now, so that only growth past the limit
        # ends processes (not a large task setup).
        self._disk_checked_at = self._started
        self._disk_used = processes.tree_bytes(self.episode_dir) \
            if self.limits.disk_bytes and self._disk is None else 0
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
        leaf, procs_files = self._cgroups.new_command() if self._cgroups else (None, [])
        oom_before = self._cgroups.oom_kills() if self._cgroups else 0
        if stdin is None:
            stdin_r, stdin_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None
        else:
            stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            process, restarted = self._spawn([BASH, "-c", command], stdin_r, out_w, procs_files)
        except BaseException:
            os.close(out_r)
            if stdin_w is not None:
                os.close(stdin_w)
            if self._cgroups is not None:
                self._cgroups.command_ended(leaf)
            raise
        finally:
            os.close(stdin_r)
            os.close(out_w)
        notes += restarted
        if stdin_w is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            threading.Thread(target=_feed_stdin, args=(os.fdopen(stdin_w, "wb"), data),
                             daemon=True).start()
        output = BoundedOutput(self.limits.output_bytes)
        # The command's shell leads its own process group (the kill where there are no cgroups).
        leader = process.pid
        ending, killed = self._pump(process, leader, leaf, out_r, output, started + timeout)
        exit_code = _exit_code(process.wait())
        if self._cgroups is not None:
            self._cgroups.command_ended(leaf)
        timed_out = ending == _TIMED_OUT
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
            expired = self._episode_expired or (self.episode_time_left() or 1.0) <= 0
            if expired:
                self._expire_episode()  # returns once every process of the episode is gone
                notes.append("episode time limit reached; every process of the episode was killed")
            elif self._cgroups is not None:
                what = "the process it started was" if killed == 1 else \
                    f"all {killed} processes it started were" if killed else "its processes were"
                notes.append(f"command timed out after {timeout:g}s; {what} killed (background jobs "
                             f"and new sessions included)")
            else:
                notes.append(f"command timed out after {timeout:g}s; its process group was killed "
                             f"(processes it moved to a new session keep running: this host has no "
                             f"cgroups)")
        if ending == _KILLED_BACKGROUND:
            notes.append("background processes were still attached to this command's output after it "
                         "ended, so the processes it started were killed (redirect a job's output, e.g. "
                         "`nohup CMD > log 2>&1 &`, to keep it running)")
        if self._cgroups is not None:
            oom = self._cgroups.oom_kills() - oom_before
            if oom > 0 and self.limits.memory_bytes is not None:
                notes.append(f"the episode reached its memory limit of "
                             f"{self.limits.memory_bytes / MIB:.0f} MiB (all its processes together); "
                             f"the kernel killed {oom} process{'es' if oom > 1 else ''}")
            self._cgroups.release_finished()
        if self._disk is not None:
            notes += self._disk_full_note()
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
        """Seconds left of limits.episode_timeout_s (negative once it has passed); None without one."""
        if self.limits.episode_timeout_s is None:
            return None
        return self.limits.episode_timeout_s - (time.monotonic() - self._started)

    def kill_all(self) -> None:
        """Kills every process of the episode; the next command starts a fresh namespace (files in the
        episode directory persist, the private /tmp does not)."""
        with self._lock:
            self._kill_holder()

    def close(self) -> None:
        """Ends the episode: kills every process it started, copies a disk-limited episode directory
        back into a plain directory (hard links and holes kept), removes its cgroups and frees its uid.
        Idempotent; run() raises SandboxClosedError afterwards."""
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
    def _server_config(self) -> dict:
        """What launcher.py's fork server needs (see launcher.py for the order in which it confines
        each command)."""
        lim = self.limits
        return {
            "ns_pid": self._holder.ns_pid,
            "pid_ns": self._holder.pid_ns,
            "uid": self.uid,
            "rlimits": [(resource.RLIMIT_CPU, lim.cpu_seconds, lim.cpu_seconds + 5),
                        (resource.RLIMIT_AS, lim.address_space_bytes, lim.address_space_bytes),
                        (resource.RLIMIT_NPROC, lim.max_processes, lim.max_processes),
                        (resource.RLIMIT_FSIZE, lim.file_size_bytes, lim.file_size_bytes),
                        (resource.RLIMIT_NOFILE, lim.open_files, lim.open_files),
                        (resource.RLIMIT_CORE, 0, 0)],
            "cap_last_cap": _last_capability(),
            "cwd": self.episode_dir,
            "seccomp": self._seccomp,
            "env": self._env,
        }

    def _spawn(self, argv: list[str], stdin_fd: int, output_fd: int, cgroup_procs: list[str]
               ) -> tuple[spawner.SpawnedCommand, list[str]]:
        """Starts a command through the fork server; if the server or the namespace died meanwhile,
        restarts both once (and says so)."""
        with self._lock:
            for attempt in range(2):
                try:
                    if self._spawner is None:
                        raise spawner.SpawnerError("no launcher")
                    return self._spawner.spawn(argv, stdin_fd, output_fd, cgroup_procs), \
                        ([] if attempt == 0 else ["the sandbox was restarted: earlier background "
                                                  "processes and /tmp are gone"])
                except spawner.SpawnerError as e:
                    if attempt == 1:
                        raise backends.SandboxUnavailableError(
                            f"the sandbox of {self.episode_dir} could not start a command after a "
                            f"restart: {e}") from e
                    self._kill_holder()
                    self._start_holder()
        raise AssertionError("unreachable")

    def _disk_full_note(self) -> list[str]:
        try:
            _, free = self._disk.used_and_free()
        except OSError:
            return []
        if free >= max(64 * 1024, self._disk.size // 100):
            return []
        return [f"the episode directory is full: it reached its disk limit of "
                f"{self._disk.size / MIB:.1f} MiB, and writes fail with 'No space left on device' "
                f"(delete files to go on)"]

    def _pump(self, process: spawner.SpawnedCommand, leader: int | None, leaf: str | None, fd: int,
              output: BoundedOutput, deadline: float) -> tuple[str, int]:
        """Reads output until EOF, the deadline, or the end of the grace period after the command's
        main process exited. Returns how it ended (_EOF, _TIMED_OUT, ...) and how many processes were
        killed."""
        os.set_blocking(fd, False)
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        grace_deadline = None
        try:
            while True:
                now = time.monotonic()
                if self._episode_expired or now >= deadline:
                    killed = self._kill_command(process, leader, leaf)
                    self._drain_briefly(fd, output)
                    return _TIMED_OUT, killed
                if grace_deadline is None and process.poll() is not None:
                    grace_deadline = now + self.limits.drain_grace_s
                if grace_deadline is not None and now >= grace_deadline:
                    # Something the command started still holds its output (a job, or a fork bomb's
                    # pipeline): all of the command's processes go, as on a timeout.
                    killed = self._kill_command(process, leader, leaf)
                    self._drain_briefly(fd, output)
                    return _KILLED_BACKGROUND, killed
                wait = min(deadline, grace_deadline or deadline) - now
                if selector.select(timeout=min(wait, 0.1)):
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return _EOF, 0
                    output.add(chunk)
        finally:
            selector.close()
            os.close(fd)

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

    def _kill_command(self, process: spawner.SpawnedCommand, leader: int | None, leaf: str | None) -> int:
        """Kills everything the command started: its cgroup (wherever its processes went, setsid and
        double forks included), else (no cgroups) its process group. Returns how many were killed."""
        if leaf is None:
            return self._kill_group(process, leader)
        killed = self._cgroups.kill_command(leaf)
        try:
            process.wait(timeout=2.0)  # the launcher exits as soon as the shell is gone
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return killed

    def _kill_group(self, process: spawner.SpawnedCommand, leader: int | None, wait_s: float = 2.0
                    ) -> int:
        """Kills the command's processes where there are no cgroups: the process group led by the
        command's shell (processes that left it with setsid are not reached). The launcher (outside that
        group) stays alive to reap the shell. killpg is atomic, so even a fork bomb cannot outrun it.
        Other members are re-parented inside the sandbox and reaped by its init; this waits (bounded)
        until they are gone, so the next command and the process census never see them. Returns how
        many processes the group had."""
        deadline = time.monotonic() + wait_s
        members = len(processes.group_members(self.uid, leader)) if leader is not None else 0
        # Only a group with members of this sandbox's uid is ours to kill (never a reused pgid).
        if members:
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
        return members

    def _ensure_ready(self) -> list[str]:
        """Restarts the namespace if it died (or was killed); returns notes for the agent."""
        notes = self._take_pending_notes()
        if processes.count_uid(self.uid) >= self.limits.max_processes - 1:
            # This command could not even start: free the process table now.
            self.kill_all()
            notes.append(_process_limit_note(self.limits.max_processes))
        with self._lock:
            if self._holder is None or not self._holder.alive() or \
                    self._spawner is None or not self._spawner.alive():
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
        if self.limits.disk_bytes is not None and self._disk is None and \
                now - self._disk_checked_at >= _DISK_CHECK_S:
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
        if self._cgroups is not None:
            # Background jobs end up children of the holder's init: they stay in the episode's caps.
            self._cgroups.add_holder(_process_tree(self._holder.process.pid))
        try:
            self._spawner = spawner.Spawner(self._server_config())
        except spawner.SpawnerError as e:
            raise backends.SandboxUnavailableError(str(e)) from e

    def _kill_holder(self) -> None:
        if self._spawner is not None:
            self._spawner.close()  # it holds the namespaces open
            self._spawner = None
        if self._holder is not None:
            self._holder.kill()
            self._holder = None
        if self._cgroups is not None:
            self._cgroups.kill_all()
        # Every process of the episode runs as its uid; pid-namespace teardown has killed them, and this
        # catches any that are still on their way out before the uid is handed to another episode.
        processes.kill_uid(self.uid)

    def _expire_episode(self) -> None:
        self._episode_expired = True
        with self._lock:
            self._kill_holder()

    def _release(self) -> None:
        """Ends every process of the episode, copies the episode file system back into the directory,
        removes the cgroups, frees the uid."""
        try:
            processes.kill_uid(self.uid)
            if self._cgroups is not None:
                self._cgroups.remove()
                self._cgroups = None
        finally:
            try:
                if self._disk is not None:
                    self._disk.detach()
            finally:
                original = os.path.join(self._private_dir, disk.ORIGINAL)
                if disk.is_mount_point(original):  # never delete through a mount of the episode directory
                    log.warning("sandbox: %s is still mounted; leaving %s in place (sweep_stale retries)",
                                original, self._private_dir)
                else:
                    shutil.rmtree(self._private_dir, ignore_errors=True)
                # Last: while the lease is held, sweep_stale in another process leaves this directory be.
                self._lease.release()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return found


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
