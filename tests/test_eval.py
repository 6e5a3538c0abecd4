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
