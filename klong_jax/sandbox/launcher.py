"""Starts one command inside a sandbox (run as a script by the host, as root; stdlib only, imports no
klong_jax).

Usage: python -I -S launcher.py CONFIG   (CONFIG: hex of marshal.dumps(dict), see Sandbox._command_argv;
the host runs this with its own interpreter, so the marshal format matches; marshal is built in, where
json would cost several milliseconds of imports per command)

Contract: the command (`bash -c ...`) runs in the holder's namespaces, in its view, as the episode's
uid, with every limit in force; no process of the agent's uid ever exists without them, and none has a
working directory or root outside the view. Order:

  parent (host pid namespace, root; invisible inside the sandbox)
    1. opens the cgroup.procs files of the command's cgroups and the holder's namespaces and root (and
       checks that the holder's pid namespace is the expected one: a reused pid is refused);
    2. enters the ipc, uts, net, pid (for its children) and mount namespaces, and the view's root
       (fchdir + chroot), so that from here on nothing of the host is reachable by path;
    3. forks the child and relays its exit status (128+N for a signal N).
  child (inside the sandbox's pid namespace, still root, so no agent process can trace or inspect it)
    4. joins the command's cgroups (memory and process caps of the episode; the host kills the command's
       cgroup on a timeout, setsid or not), becomes a session and process group leader;
    5. sets the rlimits, drops every capability from the bounding set, sets no_new_privs;
    6. switches to the agent's uid and gid (the kernel makes it non-dumpable; set again explicitly);
    7. changes to the episode directory, installs the seccomp filter (no ptrace, no keyring, ...), and
       executes the command with exactly the given environment.
Any failure before the command runs exits with 126 and a "sandbox launcher:" message on stderr.
"""
import ctypes
import marshal
import os
import resource
import signal
import sys

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
NAMESPACES = ("ipc", "uts", "net", "pid", "mnt")  # mnt last: the /proc paths are host paths


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _fail(message: str) -> None:
    try:
        os.write(2, f"sandbox launcher: {message}\n".encode())
    finally:
        os._exit(126)


def _prctl(libc, option: int, arg: int, what: str) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        _fail(f"prctl({what}) failed: {os.strerror(ctypes.get_errno())}")


def _child(cfg: dict, libc, cgroup_fds: list[int]) -> None:
    try:
        for fd in cgroup_fds:
            os.write(fd, b"0")  # "0": the writing process itself
            os.close(fd)
        os.setsid()
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals stay ignored across execve: the
        # command must get the default dispositions (`yes | head` ends yes with SIGPIPE, a write past
        # RLIMIT_FSIZE raises SIGXFSZ).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for res, soft, hard in cfg["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        for cap in range(cfg["cap_last_cap"] + 1):
            libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))
        _prctl(libc, PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
        uid = cfg["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        _prctl(libc, PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
        if os.getuid() != uid or os.geteuid() != uid:
            _fail(f"could not switch to uid {uid}")
        os.chdir(cfg["cwd"])
        program = cfg["seccomp"]
        buf = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
        if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                      ctypes.c_void_p(ctypes.addressof(fprog)), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:
            _fail(f"installing the seccomp filter failed: {os.strerror(ctypes.get_errno())}")
        argv = cfg["argv"]
        os.execve(argv[0], argv, cfg["env"])
    except OSError as e:
        _fail(f"{e}")


def main() -> None:
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cfg["cgroup_procs"]]
        pid = cfg["ns_pid"]
        ns_fds = {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                  for name in NAMESPACES}
        root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.readlink(f"/proc/self/fd/{ns_fds['pid']}") != cfg["pid_ns"]:
            _fail(f"pid {pid} is no longer the sandbox's namespace holder")
        for name in NAMESPACES:
            os.setns(ns_fds[name], 0)
            os.close(ns_fds[name])
        os.fchdir(root_fd)
        os.chroot(".")
        os.close(root_fd)
    except OSError as e:
        _fail(f"entering the sandbox failed: {e}")
    child = os.fork()
    if child == 0:
        _child(cfg, libc, cgroup_fds)
    for fd in cgroup_fds:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
