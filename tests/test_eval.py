"""Evaluation: evaluate() writes per-task scores, the summary table and the episodes; launch/eval.py
runs a tiny random model from a trainer checkpoint through the real sampler on 2 tasks, end to end."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
from ml_collections import ConfigDict

from klong_jax.agent import ScriptedPolicy, evaluate
from klong_jax.data.trajectory import parse_line
from klong_jax.models import preset
from klong_jax.sharding import make_mesh
from klong_jax.tasks import save_task
from klong_jax.training.checkpoint import Checkpointer
from klong_jax.training.optimizer import make_optimizer
from klong_jax.training.state import abstract_layout, initial_model, new_state, split_model
from klong_jax.training.step import state_shardings
from test_agent import agent_config, make_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {"tasks", "episodes", "mean_score", "score_std", "leaf_pass_rate", "submit_rate", "timeouts", "finish_reasons",
                "mean_turns", "mean_sampled_tokens", "mean_elapsed_s", "ungraded",
                "invalid_gradings", "errors"}


def test_evaluate_writes_scores_summary_and_episodes(tmp_path, capsys):
    suite = make_suite(tmp_path / "suite")
    policy = ScriptedPolicy.from_trajectories(suite.template, suite.experts)
    report, results = evaluate(suite.tasks, policy, template=suite.template, config=agent_config(),
                               workdir=str(tmp_path / "eval"), n_per_task=2, max_concurrent=3)
    written = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert written == json.loads(json.dumps(report))
    summary = written["summary"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["tasks"] == 2 and summary["episodes"] == 4
    assert summary["mean_score"] == 1.0 and summary["submit_rate"] == 1.0
    # Every episode passes every leaf: no spread, a pass rate of 1 (sum passed / sum graded).
    assert summary["score_std"] == 0.0 and summary["leaf_pass_rate"] == 1.0
    assert summary["finish_reasons"] == {"submit": 4} and summary["timeouts"] == 0
    assert summary["mean_turns"] == sum(len(r.turns) for r in results) / 4
    assert [t["task_id"] for t in written["per_task"]] == [t.task_id for t in suite.tasks]
    assert all(t["scores"] == [1.0, 1.0] and t["episodes"] == 2 for t in written["per_task"])
    assert written["config"]["context"]["budget_tokens"] == agent_config().context.budget_tokens
    lines = (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()
    trajectories = [parse_line(line) for line in lines]      # valid records of the data format
    assert sorted(t.id for t in trajectories) == sorted(r.episode_id for r in results)
    assert all(t.reward == 1.0 and t.meta["finish_reason"] == "submit" for t in trajectories)
    table = capsys.readouterr().out
    assert "ALL" in table and suite.tasks[1].task_id in table
    assert not os.listdir(tmp_path / "eval" / "episodes")   # episode directories cleaned up


def _trainer_workdir(workdir: str, tokenizer_path: str) -> None:
    """A checkpoint in the SFT trainer's layout ({"train": {params, opt_state, step}, "rest"}, as
    klong_jax.training.sft saves it) with the workdir's config.json, for a tiny random model."""
    model_cfg = preset("tiny", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                       n_routed_experts=4, compute_dtype="float32", param_dtype="float32",
                       attention_impl="reference")
    optimizer = ConfigDict(dict(lr=1e-3, warmup_steps=1, final_lr_fraction=0.1, b1=0.9, b2=0.95,
                                eps=1e-8, weight_decay=0.1, clip_norm=1.0))
    mesh = make_mesh({"fsdp": -1})
    tx = make_optimizer(optimizer, 10)
    _, abs_params, _, param_sh, _ = abstract_layout(model_cfg, mesh)
    with jax.set_mesh(mesh):
        _, params, rest = split_model(initial_model(model_cfg, mesh, init_from="", seed=0))
        state = new_state(params, tx, state_shardings(tx, param_sh, abs_params, mesh))
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        ckpt.save(3, {"train": state, "rest": rest}, meta={"step": 3}, force=True)
        ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(model_cfg), "data": {"tokenizer": tokenizer_path}}, f)


def test_eval_cli_runs_a_trainer_checkpoint_through_the_sampler(tmp_path):
    suite = make_suite(tmp_path / "suite")
    for task in suite.tasks:
        save_task(task, tmp_path / "taskset" / "tasks")
    tokenizer_path = str(tmp_path / "suite" / "sp.model")
    _trainer_workdir(str(tmp_path / "train"), tokenizer_path)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "eval.py"), "--config=configs/sft.py:tiny",
           f"--checkpoint={tmp_path / 'train'}", f"--tasks={tmp_path / 'taskset'}",
           f"--workdir={tmp_path / 'eval'}", "--config.cpu_devices=1", "--max_turns=2",
           "--max_new_tokens_per_turn=16", "--timeout_s=300", "--reminder_every=0",
           "--config.data.pipeline.context.budget_tokens=1536",
           "--config.data.pipeline.context.reserve_tokens=64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "restored step 3" in proc.stdout and "ALL" in proc.stdout
    report = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    summary = report["summary"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["tasks"] == 2 and summary["episodes"] == 2 and summary["errors"] == 0
    assert summary["ungraded"] == 0 and summary["invalid_gradings"] == 0
    assert 0.0 <= summary["mean_score"] < 0.5   # a random model does next to nothing
    assert sum(summary["finish_reasons"].values()) == 2
    assert report["tokenizer"] == tokenizer_path   # found through the workdir's config.json
    for task in report["per_task"]:
        assert task["episodes"] == 1 and 1 <= task["mean_turns"] <= 2
        assert 1 <= task["mean_sampled_tokens"] <= 32
    lines = (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["meta"]["turns"][0]["n_sampled"] >= 1 for line in lines)


def test_paired_difference_arithmetic():
    """after - before per common task: d = [0.1, 0, 0.3, -0.1] (task e is only in `after`, left out):
    mean 0.075, sd = sqrt(sum (d - 0.075)^2 / 3) = sqrt(0.0875 / 3) = 0.17078, se = sd / 2 = 0.08539,
    interval 0.075 -+ 0.17078 contains 0: noise; resolvable = 2 se."""
    from klong_jax.agent.evaluate import paired_difference
    before = {"a": 0.0, "b": 0.5, "c": 0.2, "d": 0.4}
    after = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.3, "e": 1.0}
    p = paired_difference(before, after)
    assert p["tasks"] == 4 and (p["up"], p["down"], p["same"]) == (2, 1, 1)
    assert abs(p["mean"] - 0.075) < 1e-12
    assert abs(p["sd"] - (0.0875 / 3) ** 0.5) < 1e-12 and abs(p["se"] - p["sd"] / 2) < 1e-12
    assert abs(p["low"] - (0.075 - 2 * p["se"])) < 1e-12 and abs(p["resolvable"] - 2 * p["se"]) < 1e-12
    assert p["verdict"] == "noise"
    # d = [0.2, 0.25, 0.15, 0.2]: mean 0.2, sd sqrt(0.005 / 3) = 0.0408, se 0.0204: 0.2 - 0.041 > 0, a gain;
    # the same the other way round is a loss.
    gain = {"a": 0.2, "b": 0.75, "c": 0.35, "d": 0.6}
    assert paired_difference(before, gain)["verdict"] == "gain"
    assert paired_difference(gain, before)["verdict"] == "loss"
    one = paired_difference({"a": 0.0}, {"a": 1.0})     # one task: no spread, never resolved
    assert one["tasks"] == 1 and one["mean"] == 1.0 and one["verdict"] == "noise" and one["se"] is None


def _fake_run(root, name, seed, schedule, scores_by_checkpoint, *, in_results=True):
    """A pipeline workdir as klong_jax/rl/pipeline.py writes it: results.json (held-out rows with task scores, or
    without them and eval/<checkpoint>/eval_summary.json instead, as runs before the paired table wrote) and
    config.json."""
    workdir = root / name
    workdir.mkdir()
    heldout = {}
    for ckpt, scores in scores_by_checkpoint.items():
        row = {"mean_score": sum(scores.values()) / len(scores)}
        if in_results:
            row["task_scores"] = scores
        else:
            (workdir / "eval" / ckpt).mkdir(parents=True)
            (workdir / "eval" / ckpt / "eval_summary.json").write_text(json.dumps(
                {"per_task": [{"task_id": t, "mean_score": v} for t, v in scores.items()]}))
        heldout[ckpt] = row
    (workdir / "results.json").write_text(json.dumps({"schedule": schedule, "heldout": heldout}))
    (workdir / "config.json").write_text(json.dumps({"seed": seed}))
    return str(workdir)


def test_recipe_table_pairs_scores_per_run_per_schedule_and_between_arms(tmp_path):
    """tools/recipe_table.py on hand-made workdirs: RL3 - SFT per run (resolved gain in one, noise in the other),
    pooled over a schedule's runs, and progressive - stage3_only paired by seed."""
    base = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
    sft = {"a": 0.0, "b": 0.5, "c": 0.2, "d": 0.4}
    rl_gain = {"a": 0.2, "b": 0.75, "c": 0.35, "d": 0.6}          # d = 0.2, 0.25, 0.15, 0.2: a gain
    rl_noise = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.3}           # d = 0.1, 0, 0.3, -0.1: noise
    runs = [_fake_run(tmp_path, "p0", 0, "progressive", dict(base=base, sft=sft, rl_stage3=rl_gain)),
            _fake_run(tmp_path, "p1", 1, "progressive", dict(base=base, sft=sft, rl_stage3=rl_noise), in_results=False),
            _fake_run(tmp_path, "s0", 0, "stage3_only", dict(base=base, sft=sft, rl_stage3=sft))]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "recipe_table.py"), *runs],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.stdout.splitlines() if line.startswith("| /")}
    assert "+0.200 ± 0.020 (4 tasks) | gain" in rows[runs[0]]
    assert "+0.075 ± 0.085 (4 tasks) | noise" in rows[runs[1]]       # read from eval/*/eval_summary.json
    assert "+0.000 ± 0.000 (4 tasks) | noise" in rows[runs[2]]
    # Pooled progressive: the 8 (run, task) differences 0.2, 0.25, 0.15, 0.2, 0.1, 0, 0.3, -0.1: mean 0.1375,
    # sum of squared deviations 0.1234375, sd sqrt(0.1234375 / 7) = 0.1328, se 0.1328 / sqrt(8) = 0.047: a gain.
    assert "progressive: RL stage 3 held-out score over 2 run(s)" in out.stdout
    assert "RL3 - SFT pooled over the runs' tasks: +0.137 ± 0.047 (8 tasks), gain" in out.stdout
    # Seed 0 in both arms: progressive RL3 (rl_gain) - stage3_only RL3 (sft) = the first run's differences.
    assert "progressive RL3 - stage3_only RL3, seeds 0 paired by seed and task: +0.200 ± 0.020 (4 tasks), gain" \
        in out.stdout


def test_pipeline_comparisons_pair_each_checkpoint_with_the_one_before_and_rl3_with_sft():
    from klong_jax.rl.pipeline import comparisons, results_table
    rows = {name: {"mean_score": 0.0, "task_scores": {"a": v, "b": v + 0.1}}
            for name, v in (("base", 0.0), ("sft", 0.2), ("rl_stage1", 0.3), ("rl_stage2", 0.25), ("rl_stage3", 0.4))}
    paired = comparisons(rows, ("sft", "rl_stage1", "rl_stage2", "rl_stage3"))
    assert list(paired) == ["sft - base", "rl_stage1 - sft", "rl_stage2 - rl_stage1", "rl_stage3 - rl_stage2",
                            "rl_stage3 - sft"]
    # Both tasks move by the same amount: sd 0 (up to rounding), every nonzero difference resolved.
    assert abs(paired["rl_stage3 - sft"]["mean"] - 0.2) < 1e-12 and paired["rl_stage3 - sft"]["se"] < 1e-12
    assert paired["rl_stage2 - rl_stage1"]["verdict"] == "loss" and paired["sft - base"]["verdict"] == "gain"
    only = comparisons({k: rows[k] for k in ("base", "sft", "rl_stage3")}, ("sft", "rl_stage3"))
    assert list(only) == ["sft - base", "rl_stage3 - sft"]        # the stage3_only schedule: no duplicate pair
    one = comparisons({k: {"task_scores": {"a": rows[k]["task_scores"]["a"]}} for k in ("base", "sft")}, ("sft",))
    budgets = {"rl_stage3": {"timeout_s": 1.0, "max_turns": 2, "max_total_tokens": 9, "mean_score": 1.0}}
    table = results_table({"base": rows["base"]}, budgets, {**paired, **{"one task": one["sft - base"]}})
    assert "| rl_stage3 - sft | 2 | +0.200 ± 0.000 | [+0.200, +0.200] | 2 / 0 / 0 | gain | 0.000 |" in table
    assert "| one task | 1 | +0.200 | - | 1 / 0 / 0 | noise | - |" in table


def test_paired_eval_tool_compares_each_evaluation_with_the_first(tmp_path):
    """tools/paired_eval.py on two evaluation summaries (directories or files): the pair over the common tasks."""
    def write(name, scores):
        d = tmp_path / name
        d.mkdir()
        (d / "eval_summary.json").write_text(json.dumps(
            {"per_task": [{"task_id": t, "mean_score": v} for t, v in scores.items()]}))
        return str(d)
    sft = write("sft", {"a": 0.0, "b": 0.5, "c": 0.2, "d": 0.4, "x": 1.0})
    rl = write("rl", {"a": 0.2, "b": 0.75, "c": 0.35, "d": 0.6})     # d = 0.2, 0.25, 0.15, 0.2; x unpaired
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "paired_eval.py"), sft,
                          os.path.join(rl, "eval_summary.json")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| 4 | 0.275 | 0.475 | +0.200 ± 0.020 | [+0.159, +0.241] | 4 / 0 / 0 | gain | 0.041 | 1 |" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "paired_eval.py"), sft, str(tmp_path / "no")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "/no: missing (an evaluation directory holds eval_summary.json)" in bad.stderr
