"""The episode's disk limit, enforced by the kernel: the episode directory becomes its own file system.

`EpisodeDisk.attach(episode_dir, private_dir, size)`:
  1. makes a sparse ext4 image of `size` bytes in the sandbox's private directory (no journal, no blocks
     reserved for root: all of it is the episode's, less the file system's own metadata);
  2. bind-mounts the episode directory aside (private_dir/original), mounts the image (loop device,
     nosuid, nodev) on the episode directory on the host, and copies the directory's files in.
From then on every write in the episode directory, by any process of the episode or by the host, counts
against the one limit; a write past it fails with ENOSPC (No space left on device), immediately, whatever
the number of commands or writers. The host sees the files at the same path while the sandbox lives.
`detach()` (at close) copies the files back into the original directory (owners, modes and times kept),
then unmounts and deletes the image, so the episode directory ends as a plain directory again.

If the owning process dies without close(), the mount stays on the episode directory (the files are safe
in it; `umount DIR` ends it, and the image is in the sandbox's private directory under the lock dir).

Where the image cannot be made or mounted (no mkfs.ext4, no loop devices, not root), `attach` raises
DiskLimitUnavailable; the sandbox then warns once and falls back to measuring the directory every few
seconds (see Sandbox._check_disk).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import subprocess

log = logging.getLogger(__name__)

MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_MKFS = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
_MOUNT = shutil.which("mount") or "/bin/mount"
# Smallest image mkfs.ext4 makes reliably (with room for a few files).
MIN_BYTES = 1 << 20
_warned = False


class DiskLimitUnavailable(RuntimeError):
    pass


def warn_unavailable_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("sandbox: the episode disk limit cannot be enforced by a size-limited file system "
                    "(%s). Falling back to measuring the episode directory every 2 s and killing its "
                    "processes while it is above disk_bytes (a fast writer can overshoot). Needs root, "
                    "mkfs.ext4 (e2fsprogs) and loop devices.", reason)


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DiskLimitUnavailable(f"{what} failed: {e}") from e
    if done.returncode != 0:
        raise DiskLimitUnavailable(f"{what} failed: {(done.stderr or done.stdout).strip()}")


def _bind(source: str, target: str) -> None:
    if _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(MS_BIND), None) != 0:
        err = ctypes.get_errno()
        raise DiskLimitUnavailable(f"bind-mounting {source} on {target} failed: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        log.warning("sandbox: unmounting %s failed: %s", target, os.strerror(err))


def copy_tree(source: str, dest: str) -> None:
    """Copies the contents of `source` into the existing directory `dest`: regular files, directories
    and symlinks (not followed), with owners, modes and times; other file types are skipped."""
    for entry in os.scandir(source):
        src, dst = entry.path, os.path.join(dest, entry.name)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dst)
            copy_tree(src, dst)
            shutil.copystat(src, dst, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(src, dst, follow_symlinks=False)
        else:
            continue
        os.lchown(dst, st.st_uid, st.st_gid)


def _clear(directory: str) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


class EpisodeDisk:
    """A size-limited file system mounted on an episode directory (see the module docstring)."""

    def __init__(self, episode_dir: str, image: str, original: str, size: int):
        self.episode_dir = episode_dir
        self.image = image
        self.original = original
        self.size = size
        self.attached = False

    @classmethod
    def attach(cls, episode_dir: str, private_dir: str, size: int) -> "EpisodeDisk":
        if os.geteuid() != 0:
            raise DiskLimitUnavailable("not root")
        if size < MIN_BYTES:
            raise ValueError(f"SandboxLimits.disk_bytes={size} is below the smallest episode file system "
                             f"({MIN_BYTES} bytes); use at least {MIN_BYTES} or None for no limit")
        image = os.path.join(private_dir, "disk.img")
        original = os.path.join(private_dir, "original")
        disk = cls(episode_dir, image, original, size)
        with open(image, "wb") as f:
            f.truncate(size)
        # One inode per 16 KiB (at least 256): small images keep most of their space for data.
        inodes = max(256, size // 16384)
        _run([_MKFS, "-q", "-F", "-m", "0", "-O", "^has_journal", "-N", str(inodes),
              "-E", "lazy_itable_init=1,nodiscard", image], "mkfs.ext4")
        os.makedirs(original)
        _bind(episode_dir, original)
        try:
            _run([_MOUNT, "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", image, episode_dir],
                 "mounting the episode file system")
        except BaseException:
            _umount(original)
            raise
        disk.attached = True
        try:
            shutil.rmtree(os.path.join(episode_dir, "lost+found"), ignore_errors=True)
            st = os.stat(original)
            os.chown(episode_dir, st.st_uid, st.st_gid)
            os.chmod(episode_dir, stat.S_IMODE(st.st_mode))
            copy_tree(original, episode_dir)
        except OSError as e:
            disk.detach(copy_back=False)
            if getattr(e, "errno", None) == 28:  # ENOSPC
                raise ValueError(
                    f"the files already in {episode_dir} do not fit in SandboxLimits.disk_bytes={size}; "
                    f"raise disk_bytes above their size (plus a few percent for the file system)") from e
            raise
        return disk

    def used_and_free(self) -> tuple[int, int]:
        st = os.statvfs(self.episode_dir)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize

    def detach(self, copy_back: bool = True) -> None:
        """Copies the files back into the original directory, unmounts, deletes the image. Call once no
        process of the episode is left."""
        if not self.attached:
            return
        self.attached = False
        try:
            if copy_back:
                _clear(self.original)
                copy_tree(self.episode_dir, self.original)
                shutil.copystat(self.episode_dir, self.original)
        finally:
            _umount(self.episode_dir)
            _umount(self.original)
            try:
                os.rmdir(self.original)
            except OSError:
                pass
            try:
                os.remove(self.image)
            except OSError:
                pass
