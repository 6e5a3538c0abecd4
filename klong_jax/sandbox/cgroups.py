"""Per-episode cgroups: the memory and the number of tasks of a whole episode, and a handle on every
process a command started (setsid or not) so that a timeout can kill exactly those.

Layout (the same on cgroup v2 and v1), below the cgroup of the owning process (so episodes stay inside
whatever limits the trainer itself runs under):
    <memory root>/klong_sandbox/<episode>/           memory.max / memory.limit_in_bytes: memory_bytes
    <pids root>/klong_sandbox/<episode>/             pids.max: the episode's task cap
    <pids root>/klong_sandbox/<episode>/holder       the namespace holder
    <pids root>/klong_sandbox/<episode>/c<N>         everything command N started (kept while it lives)
On v2 both roots are the unified hierarchy (where the memory and pids controllers can be enabled, i.e.
delegated to us); on v1 they are the `memory` and `pids` hierarchies (and the v1 memory cgroup holds the
episode's processes directly). Processes join these cgroups themselves (launcher.py) before they run
anything of the agent's, and no agent process can leave them (cgroupfs is not in the view, and the
agent is not root).

The cgroups of an episode whose owner died without close() are removed by `sweep_stale()` (run by
sandbox.sweep_stale, when a later sandbox is created on the host).

Where neither works, `EpisodeCgroups.create` returns None after one logging.warning that says what the
sandbox falls back to (per-process RLIMIT_AS, RLIMIT_NPROC of the episode's uid, process-group kills).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

_TOP = "klong_sandbox"
# Tasks allowed beyond max_processes: the root-owned holder and launcher processes of the episode.
HELPER_TASKS = 16


class CgroupSetupError(RuntimeError):
    pass


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of the cgroup file systems."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                found.append((fields[1].replace("\\040", " "), fields[2], set(fields[3].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and "" for v2 ("0::/path")."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for ctrl in controllers.split(",") if controllers else [""]:
                own[ctrl] = path
    return own


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class _Layout:
    """Where the episode cgroups go on this host: version 2 or 1, and the two roots."""

    def __init__(self, version: int, memory_root: str, pids_root: str):
        self.version = version
        self.memory_root = memory_root
        self.pids_root = pids_root

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.memory_root}"
        return f"cgroup v1 (memory at {self.memory_root}, pids at {self.pids_root})"


def _try_v2(mount: str, own: str) -> _Layout:
    """Below this process's own cgroup where its controllers are delegated (a v2 cgroup with processes
    cannot enable controllers for children, so that works in the root or a delegated parent), else
    below the root of the hierarchy."""
    errors = []
    for parent in dict.fromkeys((os.path.join(mount, own.lstrip("/")), mount)):
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                available = set(f.read().split())
            missing = {"memory", "pids"} - available
            if missing:
                raise CgroupSetupError(f"{parent} lacks the {sorted(missing)} controller(s) (not "
                                       f"delegated here)")
            top = os.path.join(parent, _TOP)
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            os.makedirs(top, exist_ok=True)
            _write(os.path.join(top, "cgroup.subtree_control"), "+memory +pids")
            return _Layout(2, top, top)
        except (OSError, CgroupSetupError) as e:
            errors.append(str(e))
    raise CgroupSetupError("; ".join(errors))


def _try_v1(memory_mount: str, pids_mount: str, own: dict[str, str]) -> _Layout:
    roots = []
    for ctrl, mount in (("memory", memory_mount), ("pids", pids_mount)):
        top = os.path.join(mount, own.get(ctrl, "/").lstrip("/"), _TOP)
        os.makedirs(top, exist_ok=True)
        if not os.access(os.path.join(top, "cgroup.procs"), os.W_OK):
            raise CgroupSetupError(f"{top} is not writable")
        roots.append(top)
    return _Layout(1, *roots)


_layout_lock = threading.Lock()
_layout: _Layout | None = None
_layout_error: str | None = None
_warned = False


def layout() -> _Layout | None:
    """The host's cgroup layout for sandboxes, found once per process (None: unavailable)."""
    global _layout, _layout_error
    with _layout_lock:
        if _layout is None and _layout_error is None:
            reasons = []
            mounts = _mounts()
            own = _own_cgroups()
            for point, fstype, _ in mounts:
                if fstype == "cgroup2":
                    try:
                        _layout = _try_v2(point, own.get("", "/"))
                        break
                    except (OSError, CgroupSetupError) as e:
                        reasons.append(f"v2 at {point}: {e}")
            if _layout is None:
                v1 = {ctrl: point for point, fstype, opts in mounts if fstype == "cgroup"
                      for ctrl in ("memory", "pids") if ctrl in opts}
                if len(v1) == 2:
                    try:
                        _layout = _try_v1(v1["memory"], v1["pids"], own)
                    except (OSError, CgroupSetupError) as e:
                        reasons.append(f"v1: {e}")
                else:
                    reasons.append(f"v1: no writable memory and pids hierarchies (found: {sorted(v1)})")
            if _layout is None:
                _layout_error = "; ".join(reasons) or "no cgroup file system is mounted"
        return _layout


def sweep_stale() -> None:
    """Removes the cgroups of episodes whose owning process is gone (it died without close()), after
    killing what is left in them: the namespace holder and any command of that episode still on its
    way out (a cgroup with tasks cannot be removed, and a dead owner's tasks are nobody's to keep)."""
    lay = layout()
    if lay is None:
        return
    for top in {lay.memory_root, lay.pids_root}:
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            parts = name.split("-")
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue  # its owner lives
            except ProcessLookupError:
                pass
            except OSError:
                continue
            try:
                _remove(lay.version, os.path.join(top, name), timeout_s=5.0)
            except (OSError, RuntimeError) as e:
                log.warning("sandbox: removing the stale cgroup %s failed: %s", os.path.join(top, name), e)


def warn_unavailable_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "sandbox: cgroups are unavailable (%s). Falling back to: memory capped per process only "
            "(RLIMIT_AS), processes capped by RLIMIT_NPROC of the episode's uid, and a command timeout "
            "kills the command's process group only (processes it moved to a new session with setsid "
            "survive until close() or the episode's end). Run as root on a host with cgroup v2 (memory "
            "and pids delegated) or the v1 memory and pids hierarchies to cap episodes.", _layout_error)


def _pids_in(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _subtree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first."""
    found = []
    for root, dirs, _ in os.walk(path, topdown=False):
        found.append(root)
    return found or [path]


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _kill(version: int, dirs: list[str], timeout_s: float) -> int:
    """SIGKILLs every process in the cgroups `dirs` until none is left (a fork bomb may fork while
    being killed); returns how many were killed."""
    if version == 2:
        for path in dirs:
            try:
                _write(os.path.join(path, "cgroup.kill"), "1")
            except FileNotFoundError:
                pass
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for path in dirs for pid in _pids_in(path) if not _is_zombie(pid)]
        if not alive:
            return len(killed)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of sandbox cgroup {dirs[0]} survive SIGKILL: {alive[:10]}")
        time.sleep(0.005)


def _remove(version: int, top: str, timeout_s: float) -> None:
    """Kills every process in the cgroup `top` and below, then removes them all (deepest first)."""
    if not os.path.isdir(top):
        return
    _kill(version, _subtree(top), timeout_s)
    for path in _subtree(top):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                # Killed tasks leave the cgroup once their parent has reaped them.
                if time.monotonic() > deadline:
                    log.warning("sandbox cgroup %s could not be removed", path)
                    break
                time.sleep(0.01)


class EpisodeCgroups:
    """The cgroups of one episode. Thread-safe; all paths are host paths."""

    def __init__(self, lay: _Layout, name: str, memory_bytes: int | None, max_tasks: int):
        self.layout = lay
        self.name = name
        self.memory_dir = os.path.join(lay.memory_root, name)
        self.pids_dir = os.path.join(lay.pids_root, name)
        self._lock = threading.Lock()
        self._commands = 0
        self._live: set[str] = set()  # command cgroups that may still hold processes
        # Command cgroups whose command has not ended yet: empty until its launcher joins, and never removed
        # before (another thread's release_finished would otherwise remove it between mkdir and join).
        self._running: set[str] = set()
        for path in {self.memory_dir, self.pids_dir}:
            os.makedirs(path, exist_ok=False)
        try:
            if lay.version == 2:
                _write(os.path.join(self.pids_dir, "pids.max"), str(max_tasks))
                _write(os.path.join(self.memory_dir, "memory.max"),
                       "max" if memory_bytes is None else str(memory_bytes))
                swap = os.path.join(self.memory_dir, "memory.swap.max")
                if os.path.exists(swap):
                    _write(swap, "0")
                _write(os.path.join(self.memory_dir, "cgroup.subtree_control"), "+memory +pids")
            else:
                _write(os.path.join(self.pids_dir, "pids.max"), str(max_tasks))
                if memory_bytes is not None:
                    _write(os.path.join(self.memory_dir, "memory.limit_in_bytes"), str(memory_bytes))
                    memsw = os.path.join(self.memory_dir, "memory.memsw.limit_in_bytes")
                    if os.path.exists(memsw):  # swap may not bypass the cap
                        _write(memsw, str(memory_bytes))
            os.makedirs(os.path.join(self.pids_dir, "holder"))
        except BaseException:
            self.remove()
            raise

    @classmethod
    def create(cls, name: str, memory_bytes: int | None, max_tasks: int) -> "EpisodeCgroups | None":
        lay = layout()
        if lay is None:
            warn_unavailable_once()
            return None
        return cls(lay, name, memory_bytes, max_tasks)

    # -- joining -------------------------------------------------------------------------------------
    def _procs_files(self, leaf: str) -> list[str]:
        files = [os.path.join(self.pids_dir, leaf, "cgroup.procs")]
        if self.layout.version == 1:
            files.append(os.path.join(self.memory_dir, "cgroup.procs"))
        return files

    def add_holder(self, pids: list[int]) -> None:
        for path in self._procs_files("holder"):
            for pid in pids:
                try:
                    _write(path, str(pid))
                except ProcessLookupError:
                    pass
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise

    def new_command(self) -> tuple[str, list[str]]:
        """A fresh cgroup for one command: (its id, the cgroup.procs files the launcher joins)."""
        with self._lock:
            self._commands += 1
            leaf = f"c{self._commands}"
            os.mkdir(os.path.join(self.pids_dir, leaf))
            self._live.add(leaf)
            self._running.add(leaf)
        return leaf, self._procs_files(leaf)

    def command_ended(self, leaf: str) -> None:
        """Command `leaf` has ended (or never started): release_finished may remove its cgroup once empty."""
        with self._lock:
            self._running.discard(leaf)

    # -- looking and killing ------------------------------------------------------------------------
    def kill_command(self, leaf: str, timeout_s: float = 5.0) -> int:
        """SIGKILLs every process command `leaf` started, wherever it went (setsid, double forks), and
        waits until they are gone. Returns how many processes were killed."""
        return _kill(self.layout.version, [os.path.join(self.pids_dir, leaf)], timeout_s)

    def kill_all(self, timeout_s: float = 5.0) -> int:
        return _kill(self.layout.version, _subtree(self.pids_dir), timeout_s)

    def release_finished(self) -> None:
        """Removes the cgroups of ended commands whose processes have all ended (a running command's cgroup
        stays, even while it is still empty: concurrent run() calls in one sandbox)."""
        with self._lock:
            for leaf in list(self._live - self._running):
                try:
                    os.rmdir(os.path.join(self.pids_dir, leaf))
                    self._live.discard(leaf)
                except FileNotFoundError:
                    self._live.discard(leaf)
                except OSError:  # EBUSY: background jobs of that command still run
                    pass

    def oom_kills(self) -> int:
        """How many processes the kernel has killed for the episode's memory cap so far."""
        name = "memory.events" if self.layout.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.memory_dir, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kills whatever is left and removes the episode's cgroups."""
        for top in {self.pids_dir, self.memory_dir}:
            _remove(self.layout.version, top, timeout_s)
