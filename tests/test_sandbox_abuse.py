"""Attacks on the sandbox through its public API, one per escape class of issue 17, on both backends.

Each test is written as the attacker would: model-written commands run with `Sandbox.run`, and the test
then checks from the host whether the attack worked. Against the sandbox before the issue-17 fixes every
attack below succeeded (recorded in BUILD_NOTES, session 8); now each must fail. The last three (the copy
back at close(), a SIGKILLed owner's leftovers, signals into the launcher) come from the review of those
fixes and succeeded against its first version (46b301c).

The attackers use the system's /usr/bin/python3 (visible read-only in the sandbox) with ctypes.
"""
import dataclasses
import os
import platform
import subprocess
import sys
import time
import uuid

import pytest

from klong_jax.sandbox import Sandbox, SandboxLimits, processes

BACKENDS = ["bwrap", "unshare"]
MIB = 1 << 20


def _limits(**changes) -> SandboxLimits:
    """SMALL-like limits; fields this version of SandboxLimits lacks are dropped, so that the same attack
    can be replayed against the sandbox before the fixes (which had no memory_bytes)."""
    base = dict(cpu_seconds=20, address_space_bytes=1 << 30, max_processes=48, file_size_bytes=1 << 20,
                open_files=256, output_bytes=8000, command_timeout_s=20, drain_grace_s=0.3)
    base.update(changes)
    known = {f.name for f in dataclasses.fields(SandboxLimits)}
    return SandboxLimits(**{k: v for k, v in base.items() if k in known})


def _start_background(sb: Sandbox, name: str, script: str) -> None:
    assert sb.run(f"cat > {name}.py", stdin=script).exit_code == 0
    res = sb.run(f"nohup /usr/bin/python3 {name}.py > {name}.log 2>&1 < /dev/null & "
                 f"for i in $(seq 100); do [ -s {name}.log ] && break; sleep 0.05; done; cat {name}.log")
    assert "watching" in res.output, res


def _stop_background(sb: Sandbox, name: str) -> str:
    sb.run(f"touch {name}.stop")
    res = sb.run(f"for i in $(seq 100); do grep -q '^stopped' {name}.log && break; sleep 0.05; done; "
                 f"cat {name}.log")
    return res.output


# --- class 1: host files through /proc/PID/cwd and /proc/PID/root of the set-up chain -----------------

SCAN_FS = r"""
import os
print("watching", flush=True)
hits = set()
while not os.path.exists("scan.stop"):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for link in ("cwd", "root"):
            base = f"/proc/{pid}/{link}"
            try:
                with open(base + MARKER) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if base not in hits:
                hits.add(base)
                print("ESCAPED", base, os.listdir(base)[:8], text, flush=True)
                try:
                    with open(base + WRITTEN, "w") as f:
                        f.write("x")
                    print("WROTE", base + WRITTEN, flush=True)
                except OSError:
                    pass
print("stopped", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_host_files_via_proc_of_setup_chain(tmp_path, backend, monkeypatch):
    """Class 1: a background job watches /proc for processes of the next commands' set-up chain whose
    working directory or root is outside the view, and reads and writes host files through them (a
    world-readable file and the world-writable /tmp of the host)."""
    marker = f"/tmp/klong_marker_{uuid.uuid4().hex}.txt"
    written = marker + ".written_by_agent"
    with open(marker, "w") as f:
        f.write("HOST-SECRET\n")
    os.chmod(marker, 0o644)
    script = SCAN_FS.replace("MARKER", repr(marker)).replace("WRITTEN", repr(written))
    monkeypatch.chdir("/")
    try:
        with Sandbox(tmp_path / "episode", limits=_limits(), backend=backend) as sb:
            _start_background(sb, "scan", script)
            for _ in range(40):
                sb.run("true")
            log = _stop_background(sb, "scan")
        escaped_write = os.path.exists(written)
    finally:
        for path in (marker, written):
            if os.path.exists(path):
                os.remove(path)
    assert "ESCAPED" not in log and "HOST-SECRET" not in log, log
    assert not escaped_write


# --- class 2: hijacking the next command's set-up process with ptrace ------------------------------

SCAN_PTRACE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
me, seen = os.getuid(), set()
print("watching", flush=True)
while not os.path.exists("ptrace.stop"):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or pid in seen:
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != me:
                continue
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/limits") as f:
                nproc = [l.split()[2] for l in f if l.startswith("Max processes")][0]
        except (OSError, IndexError):
            continue
        seen.add(pid)
        if comm in ("python3", "sleep"):  # this watcher and the sleeps of the test commands
            continue
        if nproc != EXPECTED_NPROC:
            print("HOST-LIMITS", pid, comm, nproc, flush=True)
        if libc.ptrace(PTRACE_ATTACH, int(pid), None, None) == 0:
            print("ATTACHED", pid, comm, flush=True)
            try:
                os.waitpid(int(pid), 0)
            except ChildProcessError:
                pass
            libc.ptrace(PTRACE_DETACH, int(pid), None, None)
        elif comm != "bash":
            print("refused", pid, comm, os.strerror(ctypes.get_errno()), flush=True)
print("stopped", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_ptrace_hijack_of_next_command(tmp_path, backend):
    """Class 2: a leftover agent process attaches with ptrace to the set-up processes of later commands
    (an attached tracer controls the process: registers, memory, the program it executes). None may
    run as the agent uid without the sandbox's limits, and none may be attachable."""
    limits = _limits()
    script = SCAN_PTRACE.replace("EXPECTED_NPROC", repr(str(limits.max_processes)))
    with Sandbox(tmp_path / "episode", limits=limits, backend=backend) as sb:
        _start_background(sb, "ptrace", script)
        for _ in range(40):
            sb.run("true")
        log = _stop_background(sb, "ptrace")
    assert "ATTACHED" not in log and "HOST-LIMITS" not in log, log


# --- class 3: the disk limit must bound the episode, not one command -------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_disk_limit_across_commands(tmp_path, backend):
    """Class 3: with disk_bytes = 16 MiB, five fast commands that each write 40 MiB."""
    limits = _limits(disk_bytes=16 * MIB, file_size_bytes=64 * MIB)
    episode = tmp_path / "episode"
    with Sandbox(episode, limits=limits, backend=backend) as sb:
        codes = [sb.run(f"head -c {40 * MIB} /dev/zero > big{i}").exit_code for i in range(5)]
        used = processes.tree_bytes(str(episode))
        res = sb.run("df -B1 --output=size . | tail -1")
        assert_alive = sb.run("rm -f big*; echo ok > after.txt && cat after.txt")
    assert used <= 16 * MIB, (used / MIB, codes, res.output)
    assert any(code != 0 for code in codes), codes
    assert assert_alive.output.startswith("ok\n"), assert_alive
    assert processes.tree_bytes(str(episode)) <= 16 * MIB
    assert (episode / "after.txt").read_text() == "ok\n"  # the files are kept after close()


# --- class 4: the kernel keyring must not carry over between episodes -----------------------------

_KEY_NR = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl
KEY_ADD = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
secret = b"KEYRING-SECRET"
kid = libc.syscall(ADD_KEY, b"user", b"klong_probe", secret, len(secret), -4)  # the user keyring
print("added", kid, ctypes.get_errno())
"""
KEY_READ = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
kid = libc.syscall(KEYCTL, 10, -4, b"user", b"klong_probe", 0)  # KEYCTL_SEARCH the user keyring
buf = ctypes.create_string_buffer(256)
n = libc.syscall(KEYCTL, 11, kid, buf, 256) if kid > 0 else -1  # KEYCTL_READ
print("found", kid, buf.raw[:max(n, 0)].decode(errors="replace"))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_keyring_carries_over(tmp_path, backend):
    """Class 4: one episode stores a key in its user keyring, the next episode (created right after it
    in the same process) looks for it."""
    add_key, keyctl = _KEY_NR.get(platform.machine(), (None, None))
    if add_key is None:
        pytest.skip(f"no keyring syscall numbers for {platform.machine()}")
    with Sandbox(tmp_path / "ep1", limits=_limits(), backend=backend) as sb:
        first = sb.run("/usr/bin/python3 -", stdin=KEY_ADD.replace("ADD_KEY", str(add_key)))
    with Sandbox(tmp_path / "ep2", limits=_limits(), backend=backend) as sb:
        second = sb.run("/usr/bin/python3 -", stdin=KEY_READ.replace("KEYCTL", str(keyctl)))
    assert "KEYRING-SECRET" not in second.output, (first.output, second.output)


# --- class 5: setsid escapes a timeout; memory across processes -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_setsid_survives_timeout(tmp_path, backend):
    """Class 5a: a command that puts processes in new sessions (with and without their own output),
    then times out: the note says its processes were killed, so all of them must be gone."""
    with Sandbox(tmp_path / "episode", limits=_limits(), backend=backend) as sb:
        res = sb.run("setsid -f sleep 301 > /dev/null 2>&1 < /dev/null; setsid sleep 302 & "
                     "(setsid sleep 303 &) ; sleep 60", timeout_s=1.5)
        assert res.timed_out and any("killed" in note for note in res.notes), res
        left = sb.run("ps -eo args | grep '^sleep 30' || true").output
        survivors = processes.count_uid(sb.uid)
    assert left == "" and survivors == 0, (left, survivors)


MEMORY_HOG = r"""
import sys, time
block = b"x" * (150 << 20)  # touched: counts against the memory of the episode
time.sleep(3)  # all four overlap
open(f"hog{sys.argv[1]}.done", "w").close()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_memory_across_processes(tmp_path, backend):
    """Class 5b: four processes of 150 MiB each (each under the per-process address-space limit) in an
    episode whose memory is capped at 256 MiB."""
    limits = _limits(memory_bytes=256 * MIB, address_space_bytes=1 << 30)
    with Sandbox(tmp_path / "episode", limits=limits, backend=backend) as sb:
        assert sb.run("cat > hog.py", stdin=MEMORY_HOG).exit_code == 0
        res = sb.run("for i in 1 2 3 4; do /usr/bin/python3 hog.py $i & sleep 0.3; done; wait; ls",
                     timeout_s=20)
    survived = sorted(p.name for p in (tmp_path / "episode").glob("hog*.done"))
    assert len(survived) <= 1, (survived, res.output)


# --- more abuse: what the seccomp filter and the view refuse ---------------------------------------

SYSCALL_PROBES = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def probe(name, *args):
    rc = libc.syscall(*args)
    print(name, "ALLOWED" if rc >= 0 else os.strerror(ctypes.get_errno()), flush=True)
NR = NUMBERS
probe("unshare-user", NR["unshare"], 0x10000000)             # CLONE_NEWUSER: capabilities in a new userns
probe("clone-newuser", NR["clone"], 0x10000000 | 17, 0, 0, 0, 0)  # SIGCHLD | CLONE_NEWUSER
probe("mount-tmpfs", NR["mount"], b"none", b"/tmp", b"tmpfs", 0, None)
probe("keyctl-session", NR["keyctl"], 1, None)              # KEYCTL_JOIN_SESSION_KEYRING
probe("ptrace-traceme", NR["ptrace"], 0, 0, 0, 0)
probe("io_uring_setup", NR["io_uring_setup"], 8, None)
probe("bpf", NR["bpf"], 0, None, 0)
probe("perf_event_open", NR["perf_event_open"], None, 0, -1, -1, 0)
probe("process_vm_readv", NR["process_vm_readv"], 1, None, 0, None, 0, 0)
"""


# The probed syscalls' numbers, written out here (not taken from the sandbox's own table).
_PROBE_NR = {"x86_64": dict(unshare=272, clone=56, mount=165, keyctl=250, ptrace=101, io_uring_setup=425,
                            bpf=321, perf_event_open=298, process_vm_readv=310),
             "aarch64": dict(unshare=97, clone=220, mount=40, keyctl=219, ptrace=117, io_uring_setup=425,
                             bpf=280, perf_event_open=241, process_vm_readv=270)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_seccomp_refusals(tmp_path, backend):
    """Namespaces, mounts, the keyring, ptrace, io_uring, bpf, perf and cross-process memory access are
    refused with EPERM (io_uring and bpf included, which need no privilege on many kernels)."""
    numbers = _PROBE_NR.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no syscall numbers for {platform.machine()}")
    with Sandbox(tmp_path / "episode", limits=_limits(), backend=backend) as sb:
        res = sb.run("/usr/bin/python3 -", stdin=SYSCALL_PROBES.replace("NUMBERS", repr(numbers)))
        fork_ok = sb.run("(sleep 0.1 &) ; /usr/bin/python3 -c 'import os; print(os.fork() >= 0)'")
    lines = dict(line.split(" ", 1) for line in res.output.splitlines())
    assert len(lines) == 9 and all(v == "Operation not permitted" for v in lines.values()), res.output
    assert fork_ok.output.startswith("True"), fork_ok  # plain clone (fork) still works


# --- class 3, at close(): the copy back of the episode file system ----------------------------------

AMPLIFY = r"""
import os
data = os.urandom(4 << 20)
with open("f", "wb") as out:
    out.write(data)
for i in range(30):
    os.link("f", f"link{i}")            # 30 more names, no more blocks
for i in range(20):
    with open(f"sparse{i}", "wb") as out:
        out.truncate(32 << 20)          # 32 MiB each, no blocks at all
with open("suid", "w") as out:
    out.write("x")
os.chmod("suid", 0o4755)
top = os.getcwd()
for i in range(3500):                   # deeper than Python's recursion limit
    os.mkdir("z")                       # (copied before link.txt: its deepest copy comes first)
    os.chdir("z")
with open("deep.txt", "w") as out:
    out.write("deep")
for i in range(3499):                   # and a link to the deepest file on every level
    os.chdir("..")
    os.link("z/deep.txt" if i == 0 else "z/link.txt", "link.txt")
os.chdir(top)
for i in range(25):                     # a path longer than PATH_MAX (4096)
    os.mkdir("n" * 200)
    os.chdir("n" * 200)
with open("long.txt", "w") as out:
    out.write("long")
print("written", len(os.getcwd()))
"""


def _scan(root: str) -> tuple[int, dict[str, str]]:
    """Bytes allocated below `root` (each inode once, however many links it has) and the contents of
    the files named *.txt, walked with fds (any depth or path length)."""
    allocated, seen, texts = 0, set(), {}
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while stack:
        fd = stack.pop()
        try:
            for entry in os.scandir(fd):
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    allocated += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
                elif entry.name.endswith(".txt"):
                    with open(os.open(entry.name, os.O_RDONLY, dir_fd=fd)) as f:
                        texts[entry.name] = f.read()
        finally:
            os.close(fd)
    return allocated, texts


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_disk_limit_amplified_at_close(tmp_path, backend):
    """Class 3 at close(): with disk_bytes = 64 MiB the agent writes a 4 MiB file with 30 hard links and
    twenty 32 MiB sparse files (about 4 MiB allocated in all), a set-uid file, a directory chain 3500
    deep (past Python's recursion limit) with a link to its deepest file on every level, and a path
    longer than PATH_MAX. Against 46b301c the copy back into the host directory made every link and
    every hole a full copy (16 MiB on the image -> 7.5 GiB on the host; a 1 GiB image with 65000 links
    fills any disk), and the deep chain made close() raise RecursionError halfway through, losing the
    files; a first fix that found each link's target by walking from the top took 11 s here (quadratic:
    an hour for a 1 GiB image). Now the host copy allocates no more than the image, links stay links,
    holes stay holes, set-uid bits are dropped, every file comes back, and close() stays fast."""
    from klong_jax.sandbox import disk
    limits = _limits(disk_bytes=64 * MIB, file_size_bytes=64 * MIB)
    episode = tmp_path / "episode"
    sb = Sandbox(episode, limits=limits, backend=backend)
    try:
        res = sb.run("/usr/bin/python3 -", stdin=AMPLIFY)
    finally:
        started = time.monotonic()
        sb.close()
        close_s = time.monotonic() - started
    try:
        assert res.output.startswith("written"), res.output
        assert not disk.is_mount_point(str(episode))
        used, texts = _scan(str(episode))
        assert used <= 64 * MIB, f"{used / MIB:.0f} MiB on the host after close()"
        assert os.stat(episode / "f").st_nlink == 31
        assert os.stat(episode / "z" / "link.txt").st_nlink == 3500
        assert os.stat(episode / "sparse3").st_size == 32 * MIB
        assert not os.stat(episode / "suid").st_mode & 0o6000
        assert texts == {"deep.txt": "deep", "link.txt": "deep", "long.txt": "long"}
        assert close_s < 6.0, f"close() took {close_s:.1f}s"
    finally:
        disk._clear(str(episode))  # pytest's own cleanup cannot remove a tree this deep


# --- leaks: what a sandbox whose owner was SIGKILLed leaves behind -----------------------------------

OWNER = r"""
import sys, time
from klong_jax.sandbox import Sandbox, SandboxLimits
sb = Sandbox(sys.argv[1], limits=SandboxLimits(disk_bytes=8 << 20, command_timeout_s=20),
             backend=sys.argv[2])
sb.run("echo kept > kept.txt; ln kept.txt alias.txt; setsid sleep 600 > /dev/null 2>&1 < /dev/null &")
print(sb.uid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_owner_leaves_nothing_after_the_next_sandbox(tmp_path, backend, monkeypatch):
    """Leak: an owner killed with SIGKILL while its sandbox has a disk limit used to leave, for good,
    the loop-mounted ext4 on the episode directory (and its loop device), the bind mount and the image
    in the lock dir, its private directory and its cgroups; an RL run whose trainers get killed now and
    then piled them up. Now the next Sandbox() on the host (sweep_stale) copies the episode's files back,
    unmounts both mounts, frees the loop device and removes the directory and the cgroups."""
    from klong_jax.sandbox import disk, sandbox as sandbox_module, uids
    episode = tmp_path / "episode"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(episode), backend], stdout=subprocess.PIPE,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        uid = int(owner.stdout.readline().split()[0])
    finally:
        owner.kill()
        owner.wait()
    assert disk.is_mount_point(str(episode))  # the leak is there until a sweep
    monkeypatch.setattr(sandbox_module, "_last_sweep", None)
    with Sandbox(tmp_path / "next", limits=_limits(), backend=backend) as sb:
        assert sb.run("true").exit_code == 0
    assert not disk.is_mount_point(str(episode))
    assert (episode / "kept.txt").read_text() == "kept\n" and os.stat(episode / "kept.txt").st_nlink == 2
    assert processes.count_uid(uid) == 0
    # Its private directory is gone (the uid's lock file stays: it is reused by every holder of the uid).
    assert [name for name in os.listdir(uids.lock_dir()) if name.startswith(f"{uid}.")] == [f"{uid}.lock"]
    with open("/proc/self/mountinfo") as f:
        assert f"{uid}." not in f.read()
    with open("/proc/self/cgroup") as f:  # no cgroup of the dead episode below this process's own
        mine = {line.split(":")[1]: line.rstrip().split(":", 2)[2] for line in f if ":pids:" in line
                or ":memory:" in line or line.startswith("0::")}
    for controller, path in mine.items():
        top = os.path.join("/sys/fs/cgroup", controller, path.lstrip("/"), "klong_sandbox")
        if os.path.isdir(top):
            assert not [name for name in os.listdir(top) if name.startswith(f"{uid}-")], top


# --- class 2, by signals: the set-up of later commands, once it has the agent's uid -------------------

SIGNAL_SETUP = r"""
import os, signal, time
me, uid = os.getpid(), os.getuid()
print("watching", flush=True)
while not os.path.exists("sigint.go"):
    time.sleep(0.01)
while not os.path.exists("sigint.stop"):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = b"sigint" in f.read()  # this job's own start and stop commands are spared
            if os.stat(f"/proc/{pid}").st_uid == uid and not mine:
                os.kill(int(pid), signal.SIGINT)
        except OSError:
            pass
print("stopped", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_signals_into_the_launcher(tmp_path, backend):
    """Class 2 by signals: a background job sends SIGINT to every process of its uid, so also to each
    later command's launcher child in the moment between its switch to the agent's uid and the exec
    (no ptrace needed: same uid). Before the fix the child's inherited Python handler answered: launcher
    code ran on as the agent's uid without the seccomp filter yet, ending in KeyboardInterrupt
    tracebacks in the command's output. Now the child has no handler: the signal just ends it, as it
    would end the command's shell."""
    with Sandbox(tmp_path / "episode", limits=_limits(max_processes=64), backend=backend) as sb:
        _start_background(sb, "sigint", SIGNAL_SETUP)
        sb.run("touch sigint.go")
        outputs = [sb.run("echo ok").output for _ in range(40)]
        sb.run("touch sigint.stop")
    leaked = [out for out in outputs if "KeyboardInterrupt" in out or "launcher" in out]
    assert not leaked, leaked[:3]
