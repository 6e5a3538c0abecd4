"""The SFT run as a user drives it (launch/train.py in subprocesses): exact resume after kill -9, SIGTERM,
restore onto another mesh, the non-finite stop, and a 2-process jax.distributed run."""
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sft_helpers import ROOT, make_data, run_train, train_cmd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("sft_data")))


def read_checkpoint(workdir: str, step: int) -> dict:
    """All arrays of a saved step as numpy, flattened by path."""
    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}/{i}", v)
        elif node is not None:  # optax's masked-out / empty states restore as None
            flat[prefix] = np.asarray(node)
    walk("", restored)
    return flat


def saved_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def wait_for_step(workdir, proc, min_step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= min_step for s in saved_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft_a"))
    run_train(workdir, data, **{"checkpoint.async_save": True})
    return workdir


def test_kill9_then_restart_is_bitwise_identical(data, uninterrupted, tmp_path):
    workdir = str(tmp_path / "b")
    proc = subprocess.Popen(train_cmd(workdir, data, **{"checkpoint.async_save": True}), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wait_for_step(workdir, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved_steps(workdir)[-1] < 6, "the run was killed too late to test a resume"
    out = run_train(workdir, data, **{"checkpoint.async_save": True})
    assert "resumed from step" in out.stdout
    a, b = read_checkpoint(uninterrupted, 6), read_checkpoint(workdir, 6)
    assert a.keys() == b.keys() and any("opt_state" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restore_onto_another_mesh(data, uninterrupted, tmp_path):
    workdir = str(tmp_path / "c")
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    assert saved_steps(workdir)[-1] == 4
    out = run_train(workdir, data, **{"mesh.shape.fsdp": 2, "mesh.shape.tensor": 4})
    assert "resumed from step 4" in out.stdout
    a, b = read_checkpoint(uninterrupted, 6), read_checkpoint(workdir, 6)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_sigterm_checkpoints_and_exits_cleanly(data, tmp_path):
    workdir = str(tmp_path / "d")
    proc = subprocess.Popen(train_cmd(workdir, data, **{"train.steps": 500, "checkpoint.every": 1,
                                                        "train.eval_every": 1000}),
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wait_for_step(workdir, proc, 1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpointed step" in out
    step = int(out.split("SIGTERM: checkpointed step ")[1].split(",")[0])
    assert step in saved_steps(workdir) and step < 500


def test_nonfinite_losses_stop_the_run_keeping_the_last_good_checkpoint(data, tmp_path):
    workdir = str(tmp_path / "e")
    proc = run_train(workdir, data, check=False, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 1,
                                                    "optimizer.clip_norm": 0.0, "train.max_nonfinite_steps": 2,
                                                    "train.steps": 8, "train.eval_every": 1000})
    assert proc.returncode != 0
    assert "non-finite steps in a row" in proc.stderr
    assert saved_steps(workdir), "the last good checkpoint must survive"
    state = read_checkpoint(workdir, saved_steps(workdir)[-1])
    assert all(np.isfinite(v).all() for v in state.values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_trains_checkpoints_and_resumes(data, tmp_path):
    workdir = str(tmp_path / "mp")

    def launch(steps):
        port = _free_port()
        procs = []
        for pid in range(2):
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "KLONG_COORDINATOR": f"127.0.0.1:{port}",
                   "KLONG_NUM_PROCESSES": "2", "KLONG_PROCESS_ID": str(pid)}
            procs.append(subprocess.Popen(train_cmd(workdir, data, **{"cpu_devices": 4, "train.steps": steps,
                                                                      "checkpoint.every": 3, "train.eval_every": 3,
                                                                      "mesh.shape.data": 2}),
                                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))
        outs = [p.communicate(timeout=400)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        return outs

    first = launch(3)
    assert "2 process(es)" in first[0] and "8 cpu devices" in first[0]
    assert saved_steps(workdir) == [3]
    second = launch(5)
    assert all("resumed from step 3" in out for out in second)
    assert 5 in saved_steps(workdir)
    assert "[train] step 5/5" in second[0]
