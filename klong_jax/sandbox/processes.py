"""Host-side bookkeeping of a sandbox uid's processes and files (reads /proc; no external tools)."""
from __future__ import annotations

import os
import signal
import time


def uid_pids(uid: int) -> list[int]:
    """Pids of live processes whose effective uid is `uid` (the owner of /proc/PID)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except FileNotFoundError:
            continue
    return pids


def group_members(uid: int, pgid: int) -> list[tuple[int, bool]]:
    """(pid, is_zombie) of `uid`'s processes in process group `pgid`."""
    members = []
    for pid in uid_pids(uid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid:
            members.append((pid, state in ("Z", "X")))
    return members


def tasks_by_uid(uids: set[int]) -> dict[int, int]:
    """Live tasks (threads included: RLIMIT_NPROC counts threads) of each uid in `uids`, from one scan
    of /proc."""
    counts = dict.fromkeys(uids, 0)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            if uid in counts:
                counts[uid] += len(os.listdir(f"/proc/{name}/task"))
        except FileNotFoundError:
            continue
    return counts


def count_uid(uid: int) -> int:
    """Live tasks of `uid`, threads included."""
    return tasks_by_uid({uid})[uid]


def kill_uid(uid: int, timeout_s: float = 5.0) -> None:
    """SIGKILLs every process of `uid` until none is left (a fork bomb may fork while being killed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = uid_pids(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of sandbox uid {uid} survive SIGKILL: {pids[:10]}")
        time.sleep(0.01)


def chown_tree(path: str, uid: int) -> None:
    """Makes the episode directory and everything in it belong to the sandbox uid (without following
    symlinks), so commands can write there and nowhere else."""
    def fix(p: str) -> None:
        st = os.lstat(p)
        if st.st_uid != uid or st.st_gid != uid:
            os.lchown(p, uid, uid)
    fix(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            fix(os.path.join(root, name))


def tree_bytes(root: str, stop_above: int | None = None) -> int:
    """Bytes allocated to the files under `root` (lstat blocks; links not followed). With stop_above, the
    walk stops as soon as the sum passes it (the caller only needs to know that it did)."""
    total, stack = 0, [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:  # removed or unreadable while walking
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
        if stop_above is not None and total > stop_above:
            break
    return total
