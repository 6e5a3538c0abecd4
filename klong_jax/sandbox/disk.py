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
in it); `recover_stale(private_dir)` (run by the sandbox's sweep, see sandbox.sweep_stale) copies them
back, unmounts both mounts (the loop device is freed with the last one) and deletes the image.

Where the image cannot be made or mounted (no mkfs.ext4, no loop devices, not root), `attach` raises
DiskLimitUnavailable; the sandbox then warns once and falls back to measuring the directory every few
seconds (see Sandbox._check_disk).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
import subprocess

log = logging.getLogger(__name__)

MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_MKFS = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
_MOUNT = shutil.which("mount") or "/bin/mount"
# In the sandbox's private directory: the image, and the bind mount of the directory underneath.
IMAGE, ORIGINAL = "disk.img", "original"
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


_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _up(fd: int) -> int:
    """An fd of the parent of the directory `fd` (which is closed)."""
    try:
        return os.open("..", _DIR_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def _copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copies a regular file's data extents only: its holes stay holes, so the copy allocates no more
    than the source does (a file made with `truncate -s 1G` costs nothing on either side)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        while start < end:
            chunk = os.pread(src_fd, min(_CHUNK, end - start), start)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                written = os.pwrite(dst_fd, view, start)
                start += written
                view = view[written:]
        pos = end
    os.ftruncate(dst_fd, size)


def _set_meta(fd: int, st: os.stat_result) -> None:
    """Owner, then mode (set-uid and set-gid bits dropped), then times, through an fd of the copy."""
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_tree(source: str, dest: str) -> None:
    """Copies the contents of the directory `source` into the existing, empty directory `dest` as the
    file system holds them: directories, regular files with their holes (a sparse file stays sparse),
    hard links as hard links, symlinks (never followed); owners, modes and times kept, set-uid and
    set-gid bits dropped (the episode file system is mounted nosuid: they never applied); other file
    types and extended attributes are skipped. So the copy allocates no more than `source` does: a
    size-limited episode file system cannot grow past its limit on the way back to the host.
    Walks with directory file descriptors (openat), a few open at a time, so any depth and any path
    length is copied (paths past PATH_MAX included), in time linear in the number of names: a file with
    several links is copied once into a flat staging directory in `dest` and linked from there, then
    the staging directory is removed. Call only while nothing else writes in either tree."""
    src_root = os.open(source, _DIR_FLAGS)
    dst_root = os.open(dest, _DIR_FLAGS)
    top_names = set(os.listdir(src_root))
    stage = f".klong-copy-links-{secrets.token_hex(8)}"
    while stage in top_names:
        stage = f".klong-copy-links-{secrets.token_hex(8)}"
    stage_fd = -1
    staged: set[str] = set()  # "device-inode" of the files with several links copied so far
    # Depth-first: each level holds the names still to copy; going up re-opens ".." on both sides.
    src_fd, dst_fd = os.dup(src_root), os.dup(dst_root)
    stack = [sorted(top_names)]
    try:
        while stack:
            if not stack[-1]:
                stack.pop()
                if stack:  # the finished directory gets its metadata, then back to its parent
                    _set_meta(dst_fd, os.fstat(src_fd))
                    src_fd, dst_fd = _up(src_fd), _up(dst_fd)
                continue
            name = stack[-1].pop()
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                child_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
                child_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                os.close(src_fd)
                os.close(dst_fd)
                src_fd, dst_fd = child_src, child_dst
                stack.append(sorted(os.listdir(src_fd)))
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink == 1:
                    _copy_file(src_fd, name, dst_fd, name, st)
                    continue
                key = f"{st.st_dev}-{st.st_ino}"
                if stage_fd < 0:
                    os.mkdir(stage, 0o700, dir_fd=dst_root)
                    stage_fd = os.open(stage, _DIR_FLAGS, dir_fd=dst_root)
                if key not in staged:
                    _copy_file(src_fd, name, stage_fd, key, st)
                    staged.add(key)
                os.link(key, name, src_dir_fd=stage_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    finally:
        for fd in (src_fd, dst_fd, src_root):
            try:
                os.close(fd)
            except OSError:  # already closed by a failed _up
                pass
        try:
            if stage_fd >= 0:
                for key in staged:
                    os.unlink(key, dir_fd=stage_fd)
                os.close(stage_fd)
                os.rmdir(stage, dir_fd=dst_root)
        finally:
            os.close(dst_root)


def _copy_file(src_dir_fd: int, src_name: str, dst_dir_fd: int, dst_name: str, st: os.stat_result
               ) -> None:
    """One regular file, as copy_tree copies it (data extents only, then owner, mode and times)."""
    src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir_fd)
    try:
        dst = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dst_dir_fd)
        try:
            _copy_data(src, dst, st.st_size)
            _set_meta(dst, st)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _clear(directory: str) -> None:
    """Deletes everything in `directory` (not itself), depth-first with directory fds (any depth or
    path length; symlinks are removed, never followed)."""
    fd = os.open(directory, _DIR_FLAGS)
    stack = [sorted(os.listdir(fd))]
    try:
        while stack:
            if not stack[-1]:
                stack.pop()
                if stack:
                    name = stack[-1].pop()
                    fd = _up(fd)
                    os.rmdir(name, dir_fd=fd)
                continue
            name = stack[-1][-1]
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append(sorted(os.listdir(fd)))
            else:
                os.unlink(name, dir_fd=fd)
                stack[-1].pop()
    finally:
        os.close(fd)


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
        image = os.path.join(private_dir, IMAGE)
        original = os.path.join(private_dir, ORIGINAL)
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
                fd = os.open(self.original, _DIR_FLAGS)
                try:  # the directory itself as copy_tree treats what is in it
                    _set_meta(fd, os.stat(self.episode_dir))
                finally:
                    os.close(fd)
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


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def _mount_table() -> list[tuple[str, str]]:
    """(mount point, source) of every mount of this mount namespace, bottom to top."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, source = left.split(), right.split()
            if len(fields) >= 5 and len(source) >= 2:
                table.append((_unescape(fields[4]), source[1]))
    return table


def is_mount_point(path: str) -> bool:
    """Whether something is mounted at `path` (bind mounts of the same file system included, which
    os.path.ismount misses)."""
    path = os.path.realpath(path)
    return any(point == path for point, _ in _mount_table())


def _loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def recover_stale(private_dir: str) -> None:
    """Ends the episode file system of a sandbox whose owner died without close() (call only while no
    process of that sandbox is left and the caller holds its uid's lease): finds where its image is
    mounted (the loop device backed by it), copies the files back into the episode directory underneath
    (if the image is still the top mount there), unmounts both mounts (the loop device is freed with the
    last) and deletes the image, so the episode directory is a plain directory with its files again."""
    image = os.path.realpath(os.path.join(private_dir, IMAGE))
    original = os.path.join(private_dir, ORIGINAL)
    table = _mount_table()
    top = {}
    for point, source in table:
        top[point] = source  # later lines are mounted on top of earlier ones
    ours = [point for point, source in table if _loop_backing_file(source) == image]
    for episode_dir in dict.fromkeys(ours):
        disk = EpisodeDisk(episode_dir, image, original, 0)
        if _loop_backing_file(top[episode_dir]) == image and is_mount_point(original):
            log.warning("sandbox: recovering the episode file system of a sandbox whose owner died: "
                        "copying %s back and unmounting it", episode_dir)
            disk.attached = True
            disk.detach()
        else:  # something else is mounted on top: unmounting the path would take that one down
            log.warning("sandbox: the stale episode file system %s on %s is not the top mount there; "
                        "leaving it (unmount it by hand)", image, episode_dir)
    if is_mount_point(original):
        _umount(original)
    try:
        os.remove(image)
    except OSError:
        pass
