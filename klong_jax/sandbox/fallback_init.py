"""Init process of the `unshare` fallback sandbox (run as a script, stdlib only; imports no klong_jax).

Started by `unshare --mount --pid --net --ipc --uts --fork --kill-child --propagation private`, so it is
pid 1 of fresh namespaces, as root (it needs root to mount). It builds the same view bubblewrap would
(read-only system paths, the episode directory read-write, a private /tmp, a minimal /dev, a fresh
/proc), pivots into it and detaches the old root (so the host's file system is no longer in this mount
namespace at all: no process here, whatever its working directory, can reach a host path), reports
"ready <host pid>" on stdout, and then reaps orphans until its owner goes: commands enter its namespaces
with launcher.py, which drops to the sandbox uid with every limit in force before running anything.

Usage: python fallback_init.py ROOT_DIR SPEC_JSON
"""
import ctypes
import fcntl
import json
import os
import platform
import select
import signal
import socket
import struct
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 1
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    rc = _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     ctypes.c_ulong(flags), data and data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source!r} on {target!r} ({fstype}): {os.strerror(err)}")


def _bind(source, target, read_only):
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        # A bind mount only becomes read-only on a remount (the kernel ignores MS_RDONLY on the bind).
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(root, spec):
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=16m")
    for kind, path, target in spec["system_entries"]:
        if kind == "symlink":
            os.symlink(target, root + path)
        else:
            _bind(path, root + path, read_only=True)
    _bind(spec["passwd_file"], root + "/etc/passwd", read_only=True)
    _bind(spec["group_file"], root + "/etc/group", read_only=True)
    os.makedirs(root + "/dev", exist_ok=True)
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "mode=755,size=64k")
    for name in spec["device_nodes"]:
        if os.path.exists("/dev/" + name):
            _bind("/dev/" + name, root + "/dev/" + name, read_only=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    os.makedirs(root + "/dev/shm")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=1777,size={spec['shm_bytes']}")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['tmp_bytes']}")
    # After /tmp, so paths under /tmp are mounted on top of the private tmpfs.
    for path in spec["extra_ro_paths"]:
        _bind(path, root + path, read_only=True)
    _bind(spec["episode_dir"], root + spec["episode_dir"], read_only=False)
    # As bubblewrap mounts it: set-uid bits and device files in the episode directory mean nothing.
    _mount(None, root + spec["episode_dir"], None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)
    # Nothing may be created next to the mounts: the root tmpfs itself becomes read-only.
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=755")


def pivot_into(root):
    """pivot_root into `root` (a mount point) and detach the old root: the classic pivot_root(".", ".")
    stacks the old root on the new one, and unmounting the top of "." removes it."""
    nr = SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(f"no pivot_root syscall number for {platform.machine()!r}")
    os.chdir(root)
    if _libc.syscall(nr, b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root into {root!r}: {os.strerror(err)}")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"detaching the old root: {os.strerror(err)}")
    os.chdir("/")


def loopback_up():
    """A new network namespace has only a loopback device, and it is down; bubblewrap brings it up,
    so commands can use local servers they start themselves (nothing outside is reachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def reap_until_owner_gone():
    """Reaps orphans as they exit, until stdin reaches EOF: stdin is a pipe whose only writer is the
    Python process that owns the sandbox, so EOF means the owner closed the sandbox or died (even by
    SIGKILL). Returning ends pid 1, and the kernel then kills everything in the namespace."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        ready, _, _ = select.select([0, wake_r], [], [], 5.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        if 0 in ready and not os.read(0, 4096):
            return


def main():
    root, spec_json = sys.argv[1], sys.argv[2]
    spec = json.loads(spec_json)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getpid() != 1:
        sys.exit("fallback_init must run as pid 1 of a new pid namespace")
    # Before the new /proc is mounted, /proc still belongs to the host: /proc/self is the host pid.
    host_pid = int(os.readlink("/proc/self"))
    _mount(None, "/", None, MS_REC | (1 << 18))  # MS_PRIVATE: no mount events leak to the host
    loopback_up()
    build_root(root, spec)
    pivot_into(root)
    sys.stdout.write(f"ready {host_pid}\n")
    sys.stdout.flush()
    os.close(1)
    os.close(2)
    os.open("/dev/null", os.O_WRONLY)
    os.open("/dev/null", os.O_WRONLY)
    reap_until_owner_gone()


if __name__ == "__main__":
    main()
