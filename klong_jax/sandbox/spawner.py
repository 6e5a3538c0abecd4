"""Host side of launcher.py's fork server: starts it for a namespace holder and asks it for commands.

`Spawner(config)` starts `launcher.py` (this interpreter, -I -S) with a socket as its stdin and waits
until it has entered the sandbox (SandboxUnavailableError if it cannot). `spawn(argv, stdin_fd,
output_fd, cgroup_procs)` starts one command and returns a `SpawnedCommand`, a small Popen-like handle
(pid = the command's shell, host pid, leader of its own process group; poll(), wait(timeout), kill()).
Thread-safe. `close()` ends the server (commands it started are not touched: the Sandbox kills them).
"""
from __future__ import annotations

import array
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import threading

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
_START_TIMEOUT_S = 20.0
_REPLY_TIMEOUT_S = 20.0


class SpawnerError(RuntimeError):
    pass


class SpawnedCommand:
    """A command started by the fork server. returncode: None while it runs, else its exit code, or
    -N when killed by signal N (as subprocess.Popen reports it); -9 if the server died first."""

    def __init__(self, pid: int, status_fd: int):
        self.pid = pid
        self.returncode: int | None = None
        self._status_fd = status_fd
        self._lock = threading.Lock()

    def _collect(self) -> None:
        data = os.read(self._status_fd, 4)
        os.close(self._status_fd)
        self._status_fd = -1
        self.returncode = os.waitstatus_to_exitcode(int.from_bytes(data, "little", signed=True)) \
            if len(data) == 4 else -signal.SIGKILL

    def poll(self) -> int | None:
        return self.wait(0.0, raise_timeout=False)

    def wait(self, timeout: float | None = None, raise_timeout: bool = True) -> int | None:
        with self._lock:
            if self.returncode is None:
                ready, _, _ = select.select([self._status_fd], [], [], timeout)
                if ready:
                    self._collect()
                elif raise_timeout:
                    raise subprocess.TimeoutExpired(f"sandbox command {self.pid}", timeout)
            return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __del__(self):
        if getattr(self, "_status_fd", -1) >= 0:
            os.close(self._status_fd)


class Spawner:
    def __init__(self, config: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", _LAUNCHER, marshal.dumps(config).hex()],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                start_new_session=True, cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        ours.settimeout(_START_TIMEOUT_S)
        try:
            first = ours.recv(4096)
        except OSError:
            first = b""
        if first != b"R":
            self.close()
            err = self.process.stderr.read().decode(errors="replace").strip()
            reason = first[1:].decode(errors="replace") if first.startswith(b"F") else err
            raise SpawnerError(f"the sandbox launcher could not start: {reason or 'no reason given'}")
        self.process.stderr.close()
        ours.settimeout(_REPLY_TIMEOUT_S)

    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self, argv: list[str], stdin_fd: int, output_fd: int, cgroup_procs: list[str]
              ) -> SpawnedCommand:
        """Starts argv; raises SpawnerError if the server is gone or the fork failed."""
        cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup_procs]
        status_r, status_w = os.pipe()
        try:
            payload = marshal.dumps({"argv": argv})
            message = len(payload).to_bytes(4, "little") + payload
            fds = array.array("i", [stdin_fd, output_fd, status_w, *cgroup_fds])
            with self._lock:
                try:
                    sent = self._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    self._sock.sendall(message[sent:])
                    reply = b""
                    while len(reply) < 4:
                        chunk = self._sock.recv(4 - len(reply))
                        if not chunk:
                            raise EOFError
                        reply += chunk
                except (OSError, EOFError) as e:
                    raise SpawnerError(f"the sandbox launcher is gone ({type(e).__name__}: {e})") from e
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
            for fd in cgroup_fds:
                os.close(fd)
        pid = int.from_bytes(reply, "little", signed=True)
        if pid <= 0:
            os.close(status_r)
            raise SpawnerError(f"the sandbox launcher could not fork: {os.strerror(-pid)}")
        return SpawnedCommand(pid, status_r)

    def close(self) -> None:
        """Ends the server (EOF on its socket; SIGKILL if it lingers)."""
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
