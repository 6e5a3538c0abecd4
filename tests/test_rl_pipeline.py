"""The KLong pipeline (SFT, RL stages 1-3, held-out evaluation) killed with SIGKILL in the middle of RL
stage 1 and rerun with the same command: finished stages are skipped, the interrupted stage resumes from
its last checkpoint, and the later stages start from the previous stage's final weights."""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline_cmd(workdir):
    values = {
        "sft.model.num_hidden_layers": 2, "sft.model.hidden_size": 64, "sft.model.n_routed_experts": 4,
        "sft.model.vocab_size": 640, "sft.data.embedded.vocab_size": 600, "sft.data.embedded.n_train": 2,
        "sft.data.embedded.n_heldout": 1, "sft.data.embedded.length": 4, "sft.train.steps": 2,
        "sft.train.global_batch": 2, "sft.train.eval_every": 2, "sft.train.eval_batches": 1,
        "sft.train.log_every": 1, "sft.checkpoint.every": 2, "sft.checkpoint.async_save": False,
        "eval.n_tasks": 1, "eval.agent.max_turns": 2, "eval.agent.max_new_tokens_per_turn": 12,
        # The 600-token vocabulary spells the system prompt's call-format line out in many pieces (~770-token
        # prefix): a smaller reserve keeps it within the 1024-token windows.
        "sft.data.pipeline.context.reserve_tokens": 128,
        # The smol variant's rollout placement (a bf16 sampler on one of the 2 devices; every stage shares this
        # section): RL weight syncs reach a sampler outside the trainer's mesh.
        "sft.rollout.devices": 1, "sft.rollout.dtype": "bfloat16", "sft.rollout.session_chunk": 32,
    }
    for stage in (1, 2, 3):
        values.update({f"rl_stage{stage}.rl.steps": 2 if stage == 1 else 1,
                       f"rl_stage{stage}.rl.tasks_per_step": 1, f"rl_stage{stage}.rl.group_size": 2,
                       f"rl_stage{stage}.rl.ppo_epochs": 1, f"rl_stage{stage}.rl.batch_rows": 2,
                       f"rl_stage{stage}.agent.max_turns": 2, f"rl_stage{stage}.rl.replay_gap": stage != 2,
                       f"rl_stage{stage}.agent.max_new_tokens_per_turn": 12,
                       f"rl_stage{stage}.agent.submit_ends_episode": stage != 1})
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/klong.py:tiny",
            f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]


def test_pipeline_resumes_after_sigkill(tmp_path):
    workdir = tmp_path / "klong"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "KLONG_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(pipeline_cmd(workdir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    stage1_ckpt = workdir / "rl_stage1" / "checkpoints" / "1"
    deadline = time.monotonic() + 600
    while not stage1_ckpt.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
    first_out = (tmp_path / "first.log").read_text()
    assert stage1_ckpt.exists(), first_out[-3000:]
    assert (workdir / "sft" / "summary.json").exists() and not (workdir / "rl_stage1" / "summary.json").exists()

    second = subprocess.run(pipeline_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True)
    out = second.stdout
    assert second.returncode == 0, out[-3000:] + second.stderr[-5000:]
    assert "[pipeline] sft: already finished, skipping" in out
    assert "stage 1: resumed from step 1" in out
    assert f"stage 2: starting from {workdir / 'rl_stage1'} (step 2)" in out
    assert f"stage 3: starting from {workdir / 'rl_stage2'} (step 1)" in out
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["heldout"]) == ["base", "sft", "rl_stage1", "rl_stage2", "rl_stage3"]
    assert all(0.0 <= row["mean_score"] <= 1.0 for row in results["heldout"].values())
    # Paired differences on the same held-out task (1 here: no spread, so never a resolved verdict).
    assert list(results["paired"]) == ["sft - base", "rl_stage1 - sft", "rl_stage2 - rl_stage1",
                                       "rl_stage3 - rl_stage2", "rl_stage3 - sft"]
    assert all(p["tasks"] == 1 and p["verdict"] == "noise" for p in results["paired"].values())
    assert all(list(row["task_scores"]) == list(results["heldout"]["base"]["task_scores"])
               for row in results["heldout"].values())
    # The expert's trajectories replayed under each stage's budget: the score that budget allows.
    assert list(results["achievable_by_stage"]) == ["rl_stage1", "rl_stage2", "rl_stage3"]
    assert all(row["max_turns"] == 2 and 0.0 <= row["mean_score"] <= 1.0
               for row in results["achievable_by_stage"].values())
    # Each RL step logs its groups: 1 task per step is 1 group, skipped when its 2 episodes tie (no variance).
    for stage, steps in (("rl_stage1", 2), ("rl_stage2", 1), ("rl_stage3", 1)):
        rows = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line).get("split") == "rl"]
        assert rows and {r["step"] for r in rows} <= set(range(1, steps + 1)), rows   # (the kill may lose one row)
        assert all(r["groups_total"] == 1 and r["groups_skipped"] in (0, 1) for r in rows), rows
        # ... and its episodes (episodes/step{k}.jsonl): the rewards the metrics average, the advantages of one
        # group summing to 0 (GRPO), each turn's calls.
        for r in rows:
            episodes = [json.loads(line) for line in
                        (workdir / stage / "episodes" / f"step{r['step'] - 1}.jsonl").read_text().splitlines()]
            assert len(episodes) == 2 and {e["group_index"] for e in episodes} == {0, 1}
            assert abs(sum(e["reward"] for e in episodes) / 2 - r["reward_mean"]) < 1e-9
            assert abs(sum(e["advantage"] for e in episodes)) < 1e-6
            assert all(len(e["tools"]) == e["turns"] for e in episodes)
            if stage == "rl_stage1":   # agent.submit_ends_episode=False there: only the budget ends an episode
                assert all(e["finish_reason"] != "submit" for e in episodes)
    # Every stage directory carries its own config (what launch/eval.py and tools/ read).
    assert json.loads((workdir / "rl_stage2" / "config.json").read_text())["stage"] == 2
    assert json.loads((workdir / "sft" / "config.json").read_text())["kind"] == "sft"

    # A third run finds every stage and every evaluation done.
    third = subprocess.run(pipeline_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(f"[pipeline] {s}: already finished, skipping" in third.stdout
               for s in ("sft", "rl_stage1", "rl_stage2", "rl_stage3"))
    assert third.stdout.count("(evaluated before,") == 5
    again = json.loads((workdir / "results.json").read_text())
    assert again["heldout"] == results["heldout"]
    # The expert replay is cheap and run again each time: same scores (its wall times differ).
    assert {k: v["mean_score"] for k, v in again["achievable_by_stage"].items()} == \
        {k: v["mean_score"] for k, v in results["achievable_by_stage"].items()}
