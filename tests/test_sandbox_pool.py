"""Sandbox pool concurrency, backend selection and fallback, output capture, uid leases."""
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from klong_jax.sandbox import (Sandbox, SandboxLimits, SandboxPool, SandboxUnavailableError, backends,
                               processes)
from klong_jax.sandbox.output import BoundedOutput
from klong_jax.sandbox.uids import acquire_uid


def test_pool_runs_episodes_concurrently_without_interference(tmp_path):
    pool = SandboxPool(max_concurrent=3, limits=SandboxLimits(command_timeout_s=20))
    live = []
    peak = []
    lock = threading.Lock()
    errors = []

    def episode(i):
        try:
            with pool.episode(tmp_path / f"ep{i}") as sb:
                with lock:
                    live.append(sb.uid)
                    peak.append(len(live))
                    assert len(set(live)) == len(live), "two live sandboxes share a uid"
                # kill -9 -1 reaches only this episode's processes (its own uid).
                res = sb.run(f"echo {i} > mine.txt; sleep 0.3; ls; cat mine.txt; "
                             f"kill -9 -1 2>/dev/null; ls {tmp_path}")
                # Other episodes' directories, siblings of this one on the host, are invisible.
                assert res.output == f"mine.txt\n{i}\nep{i}\n", res.output
                with lock:
                    live.remove(sb.uid)
        except Exception as e:  # surfaced below: assertions in threads do not fail the test
            errors.append(e)

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(peak) <= 3
    for i in range(6):
        assert sorted(os.listdir(tmp_path / f"ep{i}")) == ["mine.txt"]
        assert (tmp_path / f"ep{i}" / "mine.txt").read_text() == f"{i}\n"


def test_uid_leases_are_exclusive():
    a, b = acquire_uid(), acquire_uid()
    try:
        assert a.uid != b.uid and a.uid >= 1_000_000
        b.release()
        c = acquire_uid()
        assert c.uid != a.uid
        c.release()
    finally:
        a.release()
        b.release()


def test_env_switch_forces_fallback_still_confined(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "unshare")
    outside = tmp_path / "outside.txt"
    outside.write_text("SECRET")
    with Sandbox(tmp_path / "ep", limits=SandboxLimits(max_processes=16)) as sb:
        assert sb.backend == "unshare"
        res = sb.run(f"cat {outside}; touch /usr/x /klong_x; exec 3<>/dev/tcp/1.1.1.1/80 && echo net")
        assert "SECRET" not in res.output and "net\n" not in res.output and res.exit_code != 0
        assert sb.run("id -u; ulimit -u").output == f"{sb.uid}\n16\n" and sb.uid != 0
    assert not os.path.exists("/klong_x")


def test_auto_falls_back_with_one_warning_when_bwrap_cannot_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(backends.BWRAP_ENV, str(tmp_path / "no-bwrap"))
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        for i in range(2):
            with Sandbox(tmp_path / f"ep{i}") as sb:
                assert sb.backend == "unshare"
                assert sb.run("echo ok").output == "ok\n"
    warnings = [r for r in caplog.records if "unshare fallback" in r.getMessage()]
    assert len(warnings) == 1


def test_no_backend_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.BWRAP_ENV, str(tmp_path / "no-bwrap"))
    monkeypatch.setenv(backends.UNSHARE_ENV, str(tmp_path / "no-unshare"))
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    with pytest.raises(SandboxUnavailableError, match="no sandbox backend can start"):
        Sandbox(tmp_path / "ep")
    with pytest.raises(SandboxUnavailableError, match="'bwrap' cannot start"):
        Sandbox(tmp_path / "ep", backend="bwrap")
    with pytest.raises(ValueError, match="must be one of"):
        Sandbox(tmp_path / "ep", backend="docker")


def test_episode_dir_files_become_writable_and_system_dirs_refused(tmp_path):
    ep = tmp_path / "ep"
    ep.mkdir()
    (ep / "given.txt").write_text("from the task\n")
    with Sandbox(ep) as sb:
        assert sb.run("echo more >> given.txt && cat given.txt").output == "from the task\nmore\n"
    with pytest.raises(ValueError, match="system directory"):
        Sandbox("/usr/lib/klong_episode")


def test_bounded_output_keeps_head_and_tail():
    out = BoundedOutput(10)
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrstuvwxyz"):
        out.add(chunk)
    assert out.total_bytes == 26 and out.dropped_bytes == 16 and out.truncated
    assert out.text() == "abcde\n[... output truncated: 16 of 26 bytes omitted ...]\nvwxyz"
    small = BoundedOutput(10)
    small.add(b"0123456789")
    assert not small.truncated and small.text() == "0123456789"
    big = BoundedOutput(4)
    big.add(b"x" * 1000 + b"END")
    assert big.text() == "xx\n[... output truncated: 999 of 1003 bytes omitted ...]\nND"


def test_close_releases_uid_and_processes(tmp_path):
    sb = Sandbox(tmp_path / "ep")
    sb.run("nohup sleep 60 >/dev/null 2>&1 &")
    uid = sb.uid
    assert processes.count_uid(uid) == 1
    sb.close()
    assert processes.count_uid(uid) == 0
    sb.close()  # idempotent


def test_sandbox_and_rubric_import_no_jax():
    code = ("import sys, klong_jax.sandbox, klong_jax.rubric\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


OWNER_SCRIPT = """
import os, sys, threading
from klong_jax.sandbox import Sandbox
made = []
def make(backend):
    sb = Sandbox(os.path.join(sys.argv[1], backend), backend=backend)
    sb.run("nohup sleep 300 > /dev/null 2>&1 &")
    made.append(sb)
for backend in ("bwrap", "unshare"):
    thread = threading.Thread(target=make, args=(backend,))
    thread.start()
    thread.join()  # the thread that started the sandbox is gone; the sandbox must not be
for sb in made:
    assert sb.run("echo ok").output == "ok\\n", sb.backend
    assert sb.run("ps -eo args | grep -c '^sleep 300'").output == "1\\n", sb.backend
print(" ".join(str(sb.uid) for sb in made), flush=True)
os._exit(3)  # the owner dies without close()
"""


def test_sandbox_outlives_its_thread_and_dies_with_its_owner(tmp_path):
    done = subprocess.run([sys.executable, "-c", OWNER_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    uids = [int(u) for u in done.stdout.split()]
    assert len(uids) == 2
    deadline = time.monotonic() + 10
    while any(processes.count_uid(u) for u in uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(processes.count_uid(u) for u in uids), "a sandbox outlived its owner"


def test_without_cgroups_the_sandbox_says_so_once_and_falls_back(tmp_path, monkeypatch, caplog):
    from klong_jax.sandbox import cgroups
    monkeypatch.setattr(cgroups, "layout", lambda: None)
    monkeypatch.setattr(cgroups, "_layout_error", "none here (test)")
    monkeypatch.setattr(cgroups, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=cgroups.__name__):
        for i in range(2):
            with Sandbox(tmp_path / f"ep{i}", limits=SandboxLimits(command_timeout_s=10)) as sb:
                res = sb.run("setsid -f sleep 30 >/dev/null 2>&1 </dev/null; sleep 10", timeout_s=1)
                assert res.timed_out and any("process group" in n for n in res.notes), res
                uid = sb.uid
            assert processes.count_uid(uid) == 0  # close() still ends everything (by uid)
    warnings = [r.getMessage() for r in caplog.records if "cgroups are unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Falling back to" in warnings[0], warnings


def test_without_loop_devices_the_disk_limit_says_so_once_and_polls(tmp_path, monkeypatch, caplog):
    from klong_jax.sandbox import disk
    monkeypatch.setattr(disk, "_MKFS", str(tmp_path / "no-mkfs.ext4"))
    monkeypatch.setattr(disk, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=disk.__name__):
        for i in range(2):
            with Sandbox(tmp_path / f"ep{i}", limits=SandboxLimits(disk_bytes=4 << 20)) as sb:
                assert sb._disk is None and sb.run("echo ok > f && cat f").output == "ok\n"
    warnings = [r.getMessage() for r in caplog.records if "disk limit cannot be enforced" in r.getMessage()]
    assert len(warnings) == 1 and "Falling back to measuring" in warnings[0], warnings
    assert (tmp_path / "ep1" / "f").read_text() == "ok\n"


def test_cgroup_v2_layout_on_a_fake_hierarchy(tmp_path, monkeypatch):
    """The v2 code path (this CI host has v1) against plain files laid out like a delegated v2 tree."""
    from klong_jax.sandbox import cgroups
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(cgroups, "_mounts", lambda: [(str(tmp_path), "cgroup2", set())])
    monkeypatch.setattr(cgroups, "_own_cgroups", lambda: {"": "/"})
    monkeypatch.setattr(cgroups, "_layout", None)
    monkeypatch.setattr(cgroups, "_layout_error", None)
    lay = cgroups.layout()
    assert lay.version == 2 and lay.memory_root == lay.pids_root == str(tmp_path / "klong_sandbox")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"
    ep = cgroups.EpisodeCgroups(lay, "1-2-ab", 64 << 20, 100)
    top = tmp_path / "klong_sandbox" / "1-2-ab"
    assert (top / "memory.max").read_text() == str(64 << 20) and (top / "pids.max").read_text() == "100"
    assert (top / "cgroup.subtree_control").read_text() == "+memory +pids" and (top / "holder").is_dir()
    leaf, files = ep.new_command()
    assert files == [str(top / leaf / "cgroup.procs")]  # v2: one file joins both controllers
    assert ep.kill_command(leaf) == 0 and (top / leaf / "cgroup.kill").read_text() == "1"
    (top / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert ep.oom_kills() == 2


def test_uids_differ_between_successive_episodes(tmp_path):
    uids = []
    for i in range(3):
        with Sandbox(tmp_path / f"ep{i}") as sb:
            uids.append(sb.uid)
    assert len(set(uids)) == 3, uids
