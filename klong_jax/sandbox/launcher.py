"""Starts the commands of one sandbox (run as a script by the host, as root; stdlib only, imports no
klong_jax).

Usage: python -I -S launcher.py CONFIG   (CONFIG: hex of marshal.dumps(dict), see Sandbox._server_config;
the host runs this with its own interpreter, so the marshal format matches)

It is a small fork server (one per namespace holder): started once, it enters the holder's namespaces and
view, then forks one child per command request, so a command costs a fork, not an interpreter start.
stdin (fd 0) is a unix stream socket to the owning Sandbox: requests are a 4-byte length, a marshalled
{"argv": [...]} and, as SCM_RIGHTS, the command's stdin, its output pipe, a status pipe, and the
cgroup.procs files to join; the reply is the child's host pid (4 bytes; a negative errno when the fork
failed). When a child ends, its wait status (4 bytes) is written to its status pipe. EOF on the socket
(the Sandbox closed, or its process died) ends the server.

Contract: the command (`bash -c ...`) runs in the holder's namespaces, in its view, as the episode's
uid, with every limit in force; no process of the agent's uid ever exists without them, and none has a
working directory or root outside the view. Order:

  server (host pid namespace, root; invisible inside the sandbox)
    1. opens the holder's namespaces and root (and checks that the holder's pid namespace is the
       expected one: a reused pid is refused);
    2. enters the ipc, uts, net, pid (for its children) and mount namespaces, and the view's root
       (fchdir + chroot), so that from here on nothing of the host is reachable by path;
    3. forks one child per request and reports its exit status.
  child (inside the sandbox's pid namespace, still root, so no agent process can trace or inspect it)
    4. joins the command's cgroups (memory and process caps of the episode; the host kills the command's
       cgroup on a timeout, setsid or not), becomes a session and process group leader, takes the
       default signal dispositions;
    5. sets the rlimits, drops every capability from the bounding set, sets no_new_privs;
    6. switches to the agent's uid and gid (the kernel makes it non-dumpable; set again explicitly);
    7. changes to the episode directory, installs the seccomp filter (no ptrace, no keyring, ...), and
       executes the command with exactly the given environment.
Any failure before the command runs exits with 126 and a "sandbox launcher:" message on its output.
"""
import array
import ctypes
import marshal
import os
import resource
import select
import signal
import socket
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


# rt_sigaction(2) by number, for the signals glibc keeps from sigaction(3) (32 and 33 serve its threads).
SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
_NSIG = 64


def _default_signals(libc) -> None:
    """Every catchable signal to SIG_DFL and an empty signal mask: what a command inherits through execve
    (`yes | head` ends yes with SIGPIPE, a write past RLIMIT_FSIZE raises SIGXFSZ, a timeout's SIGHUP ends a job).

    Python (and glibc's sigaction) refuse signals 32 and 33, yet an owner may have them ignored (CI's runner
    ignored 32) and an ignored signal stays ignored across execve, so those go through the raw syscall. Its
    kernel struct (handler, flags, [restorer,] mask) is all zeros for SIG_DFL with no flags and an empty mask,
    so 32 zero bytes are that struct on every architecture."""
    for sig in range(1, _NSIG + 1):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):   # signals the C library reserves for itself (32, 33)
            nr = SYS_RT_SIGACTION.get(os.uname().machine)
            if nr is None:
                _fail(f"no rt_sigaction syscall number for {os.uname().machine!r}: cannot reset signal {sig}")
            act = ctypes.create_string_buffer(32)
            if libc.syscall(ctypes.c_long(nr), ctypes.c_long(sig), act, None, ctypes.c_ulong(_NSIG // 8)) != 0:
                _fail(f"rt_sigaction({sig}, SIG_DFL) failed: {os.strerror(ctypes.get_errno())}")
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _child(cfg: dict, libc, cgroup_fds: list[int]) -> None:
    try:
        for fd in cgroup_fds:
            os.write(fd, b"0")  # "0": the writing process itself
            os.close(fd)
        os.setsid()
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
    except BaseException as e:  # noqa: BLE001 - whatever fails, never back into the server's loop
        _fail(f"{type(e).__name__}: {e}")


def _enter(cfg: dict) -> None:
    pid = cfg["ns_pid"]
    ns_fds = {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
              for name in NAMESPACES}
    root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if os.readlink(f"/proc/self/fd/{ns_fds['pid']}") != cfg["pid_ns"]:
        raise OSError(f"pid {pid} is no longer the sandbox's namespace holder")
    for name in NAMESPACES:
        os.setns(ns_fds[name], 0)
        os.close(ns_fds[name])
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _reap(status_fds: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_fds.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, status.to_bytes(4, "little", signed=True))
            except OSError:  # the Sandbox stopped waiting for it
                pass
            os.close(fd)


def serve(cfg: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(fileno=0)
    try:
        _enter(cfg)
    except OSError as e:
        sock.sendall(b"F" + f"entering the sandbox failed: {e}".encode())
        os._exit(1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    status_fds: dict[int, int] = {}
    sock.sendall(b"R")
    max_fds = 64
    while True:
        _reap(status_fds)
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        if sock not in ready:
            continue
        try:
            head, ancdata, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(max_fds * 4),
                                               socket.MSG_CMSG_CLOEXEC)
            if not head:
                break
            fds = array.array("i")
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            head += _recv_exactly(sock, 4 - len(head))
            request = marshal.loads(_recv_exactly(sock, int.from_bytes(head, "little")))
        except (EOFError, OSError):
            break
        stdin_fd, output_fd, status_fd, *cgroup_fds = fds
        try:
            child = os.fork()
        except OSError as e:
            child = -e.errno
        if child == 0:
            # Every disposition back to the default and nothing blocked, first thing in the child. No Python
            # handler: once it has the agent's uid, agent processes may signal it, and a handler
            # (KeyboardInterrupt on SIGINT) would run launcher code in reply. Nothing ignored: ignored
            # signals stay ignored across execve, and the owner may ignore some (Python: SIGPIPE, SIGXFSZ;
            # nohup: SIGHUP; a background job of a shell: SIGINT, SIGQUIT).
            _default_signals(libc)
            signal.set_wakeup_fd(-1)
            os.dup2(stdin_fd, 0)
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            _child(dict(cfg, argv=request["argv"]), libc, cgroup_fds)
        for fd in (stdin_fd, output_fd, *cgroup_fds):
            os.close(fd)
        if child > 0:
            status_fds[child] = status_fd
        else:
            os.close(status_fd)
        try:
            sock.sendall(child.to_bytes(4, "little", signed=True))
        except OSError:
            break
    os._exit(0)  # the commands still running are the Sandbox's to end (it kills their cgroups)


def main() -> None:
    serve(marshal.loads(bytes.fromhex(sys.argv[1])))


if __name__ == "__main__":
    main()
