"""Multi-host RL (rl/multihost.py): one RL step split over 2 jax.distributed processes on loopback equals the
single-process step, and a whole RL stage runs with 2 processes (launch/train.py).

The equality is checked on the UPDATE, which is deterministic: a rollout is sampled once (1 process) and saved;
then 1 process trains on all groups and 2 processes each on their half (rl/multihost.py `process_share`), and
the new parameters, the gathered metrics and the step's episodes file must agree. This file is also the worker
both runs execute (`python tests/test_rl_multihost.py MODE OUT`).
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rewards per group (4 tasks x 2 episodes), overriding the sampled ones so that the update has signal:
# "uneven": process 0's two groups both train, process 1 has one skipped group (fewer rows: padded batches);
# "idle": process 1's groups are both skipped (no rows at all: it sends fully masked rows).
REWARDS = {"idle": [[1.0, 0.0], [0.0, 0.5], [0.5, 0.5], [0.0, 0.0]],
           "uneven": [[1.0, 0.0], [0.0, 1.0], [0.25, 1.0], [0.5, 0.5]]}
# Each case's rl overrides and batch layout. "uneven": one optimizer step on the exactly summed gradient of all
# batches (however the rows are batched), the batch split over the processes (make_array_from_process_local_data).
# "idle": one step per batch, every row in one batch (8 rows: 4 per process) either way, the batch replicated over
# the processes (each process's rows gathered to all: multihost.global_rows' general path).
CASES = {"uneven": (dict(minibatches=1), "split"), "idle": (dict(minibatches=0), "replicated")}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # the worker sets its own device count
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _config():
    from configs.rl_common import rl_config
    cfg = rl_config(stage=1, variant="tiny")
    cfg.init_from = ""   # a random tiny model
    cfg.model.update(num_hidden_layers=2, hidden_size=64, n_routed_experts=4, vocab_size=640)
    cfg.data.embedded.update(vocab_size=600, n_train=4, n_heldout=1, length=4)
    cfg.data.pipeline.context.reserve_tokens = 128
    # replay_gap off: one forward pass for the old log-probs (the test compares the update, not the mismatch study)
    cfg.rl.update(steps=1, tasks_per_step=4, group_size=2, ppo_epochs=1, batch_rows=8, minibatches=1,
                  replay_gap=False)
    cfg.agent.update(max_turns=2, max_new_tokens_per_turn=12)
    return cfg


def _worker(mode: str, out: str) -> None:
    """mode "sample": (1 process) roll out the step's 4 tasks x 2 episodes, save them, then train as "train" does,
    and the control (half.npz: the "uneven" update on process 0's groups alone).
    mode "train": every case of REWARDS from the same initial state on this process's share of the saved groups;
    process 0 writes OUT/{case}.npz (new params), {case}.json (metrics), {case}.jsonl (the episodes file) and
    initial.npz. With several processes it also hands the new weights to each process's own sampler and counts
    the arrays that arrived unchanged."""
    import time
    t0 = time.perf_counter()
    from klong_jax.runtime import setup_devices
    # 2 devices in all either way (the fsdp mesh over both; batch_rows=8 splits the batch over the processes)
    setup_devices(2 // int(os.environ.get("KLONG_NUM_PROCESSES", "1")))
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import PartitionSpec
    from klong_jax.agent import run_episodes
    from klong_jax.rl import multihost
    from klong_jax.rl.config import RLConfig
    from klong_jax.rl.loop import learn_from_episodes, setup_stage
    from klong_jax.sandbox import SandboxPool
    from klong_jax.training.embedded_data import prepare_embedded
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = _config()
    st = setup_stage(cfg, prepare_embedded(cfg.data.embedded))
    rl = RLConfig.from_mapping(cfg.rl)
    saved = os.path.join(out, "..", "episodes.pkl")
    with jax.set_mesh(st.mesh):
        state, rest, frozen = st.initial_train_state(cfg, out)
        print(f"[{time.perf_counter() - t0:.0f} s] initialised", flush=True)
        if mode == "sample":
            results = run_episodes(st.tasks[:rl.tasks_per_step], st.policy(cfg, state, rest, frozen),
                                   n_per_task=rl.group_size, template=st.template, config=st.agent_cfg,
                                   pool=SandboxPool(max_concurrent=8), workdir=os.path.join(out, "rollout"),
                                   tag="s0-", return_routing=True, return_prompt_routing=True)
            with open(saved, "wb") as f:
                pickle.dump(results, f)
        print(f"[{time.perf_counter() - t0:.0f} s] ready", flush=True)
        with open(saved, "rb") as f:
            results = pickle.load(f)
        mine = set(multihost.process_share(range(rl.tasks_per_step)))
        print(f"process {jax.process_index()}: groups {sorted(mine)} of {jax.process_count()} process(es), "
              f"{jax.device_count()} devices", flush=True)
        for case, rewards in REWARDS.items():   # ("uneven" last: the control below uses its rewards)
            for i, r in enumerate(results):
                r.reward = rewards[i // rl.group_size][i % rl.group_size]
            overrides, layout = CASES[case]
            case_rl = RLConfig.from_mapping({**cfg.rl.to_dict(), **overrides})
            case_st = st if layout == "split" else dataclasses.replace(st, batch_spec=PartitionSpec())
            start = jax.tree.map(jnp.copy, state)   # the update donates its state
            new, metrics = learn_from_episodes(case_st, case_rl, start, rest, start["params"], frozen,
                                               [r for i, r in enumerate(results) if i // rl.group_size in mine],
                                               rollouts_path=os.path.join(out, f"{case}.jsonl"))
            print(f"[{time.perf_counter() - t0:.0f} s] {case}: trained", flush=True)
            _save(os.path.join(out, f"{case}.npz"), new["params"])
            if jax.process_index() == 0:
                with open(os.path.join(out, f"{case}.json"), "w") as f:
                    json.dump(metrics, f)
        if mode == "train":   # the weight sync reaches each process's own sampler
            policy = st.policy(cfg, state, rest, frozen)
            policy.update_params(st.sync_params(new, frozen))
            synced = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(policy.sampler.state))[0])
            sent = jax.tree_util.tree_flatten_with_path(multihost.host_copy(new["params"]))[0]
            same = sum(np.array_equal(np.asarray(synced[p]), v) for p, v in sent)
            print(f"process {jax.process_index()}: sampler synced, {same}/{len(sent)} arrays equal", flush=True)
        if mode == "sample":   # the control: the "uneven" update on process 0's groups alone
            start = jax.tree.map(jnp.copy, state)
            new, _ = learn_from_episodes(st, RLConfig.from_mapping({**cfg.rl.to_dict(), **CASES["uneven"][0]}),
                                         start, rest, start["params"], frozen, results[:2 * rl.group_size])
            _save(os.path.join(out, "half.npz"), new["params"])
        _save(os.path.join(out, "initial.npz"), state["params"])


def _save(path: str, params) -> None:
    """Global params -> one .npz (flattened by path), written by process 0."""
    import jax
    from klong_jax.rl import multihost
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(multihost.host_copy(params))[0]}
    if jax.process_index() == 0:
        np.savez(path, **flat)


def _run_workers(mode: str, out: str, processes: int, cache: str, timeout: int = 600):
    from conftest import free_port
    os.makedirs(out, exist_ok=True)
    port = free_port()
    procs = []
    for pid in range(processes):
        extra = {"KLONG_CACHE": cache}
        if processes > 1:
            extra.update(KLONG_COORDINATOR=f"127.0.0.1:{port}", KLONG_NUM_PROCESSES=str(processes),
                         KLONG_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, out], cwd=ROOT,
                                      env=_env(**extra), text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    return _wait(procs, timeout)


def _wait(procs, timeout: int) -> list[str]:
    """The processes' outputs once all exit 0. A process that dies leaves the other one waiting in a collective:
    on a failure or a timeout every process is killed."""
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-5000:]
    return outs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The embedded tiny suite, generated once here (the workers only read it)."""
    from klong_jax.training.embedded_data import prepare_embedded
    root = str(tmp_path_factory.mktemp("cache"))
    prepare_embedded(_config().data.embedded, cache_root=root)
    return root


@pytest.fixture(scope="module")
def updates(cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    one = _run_workers("sample", str(base / "one"), 1, cache)
    two = _run_workers("train", str(base / "two"), 2, cache)
    return base, one, two


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("case", list(REWARDS))
def test_two_process_update_equals_one_process_update(updates, case):
    base, one_out, two_out = updates
    assert "groups [0, 1] of 2 process(es), 2 devices" in two_out[0]
    assert "groups [2, 3] of 2 process(es), 2 devices" in two_out[1]
    for pid, text in enumerate(two_out):
        synced = text.split(f"process {pid}: sampler synced, ")[1].split(" arrays")[0].split("/")
        assert synced[0] == synced[1] != "0", text[-3000:]
    initial, initial_two = _load(base / "one" / "initial.npz"), _load(base / "two" / "initial.npz")
    for k in initial:   # the same random init on either mesh
        np.testing.assert_array_equal(initial_two[k], initial[k], err_msg=k)
    one, two = _load(base / "one" / f"{case}.npz"), _load(base / "two" / f"{case}.npz")
    assert one.keys() == two.keys() == initial.keys()
    # One AdamW step at lr 1e-4 moves (almost) every parameter by ~lr: a missing or doubled process's rows would
    # move them differently; the two runs differ only in how the rows are packed and summed.
    moved = max(float(np.abs(one[k] - initial[k]).max()) for k in one)
    assert moved > 5e-5, moved
    if case == "uneven":   # the control: process 0's groups alone move the parameters visibly differently
        half = _load(base / "one" / "half.npz")
        assert max(float(np.abs(half[k] - one[k]).max()) for k in one) > 2e-5
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=2e-6, err_msg=k)
    m1 = json.loads((base / "one" / f"{case}.json").read_text())
    m2 = json.loads((base / "two" / f"{case}.json").read_text())
    assert m1.keys() == m2.keys()
    assert m1["episodes"] == m2["episodes"] == 8 and m1["groups_total"] == m2["groups_total"] == 4
    assert m1["groups_skipped"] == m2["groups_skipped"] == {"uneven": 1, "idle": 2}[case]
    exact = [k for k in m1 if k in ("episodes", "turns_mean", "tokens_mean", "windows_per_episode", "windows",
                                    "reward_mean", "reward_std", "groups_total", "groups_skipped")
             or k.startswith("finish_")]
    assert {k: m2[k] for k in exact} == {k: m1[k] for k in exact}
    # The update's figures (not the per-batch mismatch means: the 2-process rows are batched differently).
    for k in ("loss", "grad_norm", "entropy", "lr", "nonfinite"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-4, atol=1e-7, err_msg=k)
    assert all(np.isfinite(m2[k]) for k in m2 if k.startswith("mismatch_"))
    # Process 0 wrote the step's episodes file with every process's episodes, in task order.
    assert (base / "two" / f"{case}.jsonl").read_text() == (base / "one" / f"{case}.jsonl").read_text()


def test_a_step_needs_whole_groups_and_batches_per_process():
    from klong_jax.rl import multihost
    assert list(multihost.process_share(range(6), 2, 1)) == [3, 4, 5]
    with pytest.raises(ValueError, match="rl.tasks_per_step=3 must be divisible by the 2 processes"):
        multihost.process_share(range(3), 2, 0)
    assert multihost.local_rows(8, 2) == 4
    with pytest.raises(ValueError, match="rl.batch_rows=3 must be divisible by the 2 processes"):
        multihost.local_rows(3, 2)


@pytest.mark.slow
def test_two_process_rl_stage_runs_end_to_end(cache, tmp_path):
    """launch/train.py on an RL stage with 2 processes (one device each, the trainer's fsdp mesh over both): each
    rolls out its task's group with its own sampler, sandboxes and episodes directory; process 0 logs the gathered
    step (all 4 episodes) and the episodes file; a checkpoint. (A random model's episodes usually all score 0, so
    the groups are skipped and nothing is updated: the update is the equality test's.)"""
    from conftest import free_port
    workdir = tmp_path / "rl"
    values = {"init_from": "", "cpu_devices": 1, "model.num_hidden_layers": 2, "model.hidden_size": 64,
              "model.n_routed_experts": 4, "model.vocab_size": 640, "data.embedded.vocab_size": 600,
              "data.embedded.n_train": 4, "data.embedded.n_heldout": 1, "data.embedded.length": 4,
              "data.pipeline.context.reserve_tokens": 128, "rl.steps": 1, "rl.tasks_per_step": 2,
              "rl.group_size": 2, "rl.ppo_epochs": 1, "rl.batch_rows": 2, "rl.minibatches": 0,
              "agent.max_turns": 2, "agent.max_new_tokens_per_turn": 12}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/rl_stage1.py:tiny",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(KLONG_CACHE=cache, KLONG_COORDINATOR=f"127.0.0.1:{port}",
                                       KLONG_NUM_PROCESSES="2", KLONG_PROCESS_ID=str(pid)))
             for pid in range(2)]
    outs = _wait(procs, 600)
    assert "2 process(es)" in outs[0]
    assert "[rl stage 1 process 1] step 1/1 rollout" in outs[1]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line).get("split") == "rl"]
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert rows[0]["episodes"] == 4 and rows[0]["groups_total"] == 2, rows
    episodes = [json.loads(line) for line in (workdir / "episodes" / "step0.jsonl").read_text().splitlines()]
    assert len(episodes) == 4 and abs(np.mean([e["reward"] for e in episodes]) - rows[0]["reward_mean"]) < 1e-9
    assert len({e["task_id"] for e in episodes}) == 2
    for pid in range(2):   # each process's own episodes directory
        assert (workdir / "episodes" / "step0" / f"process{pid}").is_dir()
    assert (workdir / "checkpoints" / "1").is_dir() and (workdir / "summary.json").exists()


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
