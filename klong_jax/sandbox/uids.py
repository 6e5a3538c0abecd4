"""One unprivileged uid per live sandbox, unique across all processes on the host.

Why a uid per sandbox: RLIMIT_NPROC counts the live processes of a uid, so a private uid makes
max_processes bound exactly one episode (and binds at all: root ignores RLIMIT_NPROC); episodes can
neither signal nor read each other's processes; and every process of an episode can be found by uid.
Uniqueness across trainer processes comes from an flock on a per-uid lock file: the kernel drops the
lock when its holder dies, so a crashed trainer never leaks uids.

A fresh uid per episode: successive acquisitions in one process go round the whole range instead of
taking the lowest free uid again, so an episode never gets the uid the previous one just had (kernel
state keyed by uid, such as its user keyring, would otherwise carry over; the seccomp filter also
denies the keyring syscalls).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import tempfile
import threading

# Far above the ids distributions hand out to people and services (and above the usual subuid ranges),
# so a sandbox uid owns no file on the host outside its episode directory.
DEFAULT_UID_BASE = 3_000_000
DEFAULT_UID_COUNT = 4096
_turn = itertools.count()
_turn_lock = threading.Lock()


def lock_dir() -> str:
    path = os.environ.get("KLONG_SANDBOX_LOCK_DIR") or os.path.join(tempfile.gettempdir(),
                                                                     "klong_sandbox_uids")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class UidLease:
    """An exclusively held uid; release() (or process death) frees it."""

    def __init__(self, uid: int, fd: int):
        self.uid = uid
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def acquire_uid(base: int | None = None, count: int | None = None) -> UidLease:
    base = int(os.environ.get("KLONG_SANDBOX_UID_BASE", DEFAULT_UID_BASE)) if base is None else base
    count = DEFAULT_UID_COUNT if count is None else count
    directory = lock_dir()
    # Start at a pid-dependent offset so concurrent trainers rarely contend for the same lock files,
    # and move on by one (plus a stride) per acquisition, so the uid of a closed episode is not reused next.
    with _turn_lock:
        turn = next(_turn)
    start = (os.getpid() * 61 + turn * 1031) % count
    for i in range(count):
        lease = try_acquire(base + (start + i) % count, directory)
        if lease is not None:
            return lease
    raise RuntimeError(f"all {count} sandbox uids from {base} are in use (lock files in {directory})")


def try_acquire(uid: int, directory: str | None = None) -> UidLease | None:
    """The lease of `uid` if no live sandbox holds it (in any process, this one included), else None."""
    directory = directory or lock_dir()
    fd = os.open(os.path.join(directory, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return UidLease(uid, fd)
