"""The whole KLong recipe: trajectory-splitting SFT, then RL stages 1..3 with growing episode timeouts,
then a held-out evaluation of every checkpoint. Each stage lives in its own sub-workdir; a finished stage
(summary.json written) is skipped and an unfinished one resumes from its checkpoint, so rerunning the same
command after an interruption continues where it stopped."""
import json
import os

import jax
import numpy as np

from klong_jax.agent import AgentConfig, ScriptedPolicy, evaluate
from klong_jax.agent.evaluate import SUMMARY_FILE
from klong_jax.agent.sampler_policy import SamplerPolicy
from klong_jax.data.chat_template import make_chat_template
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.data.trajectory import read_jsonl
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.rl.loop import load_tasks, run_rl
from klong_jax.sharding import make_mesh
from klong_jax.training.sft import run_sft
from klong_jax.training.state import initial_model, load_trained_model

STAGES = ("sft", "rl_stage1", "rl_stage2", "rl_stage3")
EVAL_CONCURRENCY = 8   # held-out episodes run (and sampled) together


def run_stage(name, cfg, workdir, data_paths):
    stage_dir = os.path.join(workdir, name)
    done = os.path.join(stage_dir, "summary.json")
    if os.path.exists(done):
        print(f"[pipeline] {name}: already finished, skipping", flush=True)
        return
    print(f"[pipeline] {name}: running in {stage_dir}", flush=True)
    if jax.process_index() == 0:   # the stage's own config, so eval / serve / tools read its directory alone
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    result = (run_sft if name == "sft" else run_rl)(cfg, stage_dir, data_paths)
    if jax.process_index() == 0:
        with open(done, "w") as f:
            json.dump(result["summary"], f, indent=2)


def evaluate_checkpoints(cfg, workdir, data_paths) -> dict:
    """Held-out mean rubric score of the untrained model (the SFT stage's starting weights: random, or its
    init_from upcycled as configured) and of every stage's final checkpoint."""
    model_cfg = model_config_from(cfg.sft.model)
    mesh = make_mesh(dict(cfg.sft.mesh.shape))
    template = make_chat_template(load_tokenizer(data_paths["tokenizer"]), cfg.sft.data.get("chat_template", "auto"))
    tasks = load_tasks(data_paths["heldout_tasks"], cfg.eval.n_tasks)
    agent_cfg = AgentConfig.from_mapping(cfg.eval.agent, context=cfg.sft.data.pipeline.context)
    table = {}
    for name in ("untrained",) + STAGES:
        eval_dir = os.path.join(workdir, "eval", name)
        done = os.path.join(eval_dir, SUMMARY_FILE)
        stage_done = os.path.join(workdir, name, "summary.json")
        if os.path.exists(done) and not (os.path.exists(stage_done) and
                                         os.path.getmtime(stage_done) > os.path.getmtime(done)):
            # Evaluated before an interruption, and the stage has not been run again since.
            with open(done) as f:
                report = json.load(f)
            table[name] = _numbers(report["summary"])
            print(f"[pipeline] held-out {name}: mean score {table[name].get('mean_score', float('nan')):.4f} "
                  f"(evaluated before, {done})", flush=True)
            continue
        with jax.set_mesh(mesh):
            if name == "untrained":
                model = initial_model(model_cfg, mesh, init_from=cfg.sft.init_from, seed=cfg.sft.seed,
                                      upcycle=upcycle_config_from(cfg.sft.model))
            else:
                model, _ = load_trained_model(os.path.join(workdir, name), model_cfg, mesh)
            policy = SamplerPolicy.from_model(model, mesh, seed=cfg.eval.seed, **SamplerPolicy.rollout_buckets(
                agent_cfg, min(EVAL_CONCURRENCY, len(tasks) * cfg.eval.n_per_task)))
            report, _ = evaluate(tasks, policy, template=template, config=agent_cfg,
                                 workdir=eval_dir, n_per_task=cfg.eval.n_per_task, tag=f"{name}-", print_fn=None,
                                 max_concurrent=EVAL_CONCURRENCY)
        table[name] = _numbers(report["summary"])
        print(f"[pipeline] held-out {name}: mean score {table[name].get('mean_score', float('nan')):.4f}", flush=True)
    return table


def achievable_by_stage(cfg, workdir, data_paths) -> dict:
    """Held-out score of the scripted expert's recorded trajectories replayed through the agent under each
    stage's budget (timeout, turns, tokens): what a stage's budget lets a policy achieve at best. A stage
    whose budget ends an episode before the work is done caps the score its rollouts can earn."""
    template = make_chat_template(load_tokenizer(data_paths["tokenizer"]), cfg.sft.data.get("chat_template", "auto"))
    tasks = load_tasks(data_paths["heldout_tasks"], cfg.eval.n_tasks)
    wanted = {t.task_id for t in tasks}
    experts = [t for path in data_paths["eval"] for t in read_jsonl(path) if t.task_id in wanted]
    table = {}
    for name in STAGES[1:]:
        agent_cfg = AgentConfig.from_mapping(cfg[name].agent, context=cfg.sft.data.pipeline.context)
        report, _ = evaluate(tasks, ScriptedPolicy.from_trajectories(template, experts), template=template,
                             config=agent_cfg, workdir=os.path.join(workdir, "eval", f"expert_{name}"),
                             tag=f"expert-{name}-", print_fn=None, max_concurrent=EVAL_CONCURRENCY)
        table[name] = {"timeout_s": agent_cfg.timeout_s, "max_turns": agent_cfg.max_turns,
                       **_numbers(report["summary"])}
        print(f"[pipeline] {name} budget ({agent_cfg.timeout_s:.0f} s, {agent_cfg.max_turns} turns): the expert "
              f"replayed scores {table[name]['mean_score']:.4f} on held-out tasks", flush=True)
    return table


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def run_pipeline(cfg, workdir: str, data_paths: dict) -> dict:
    for name in STAGES:
        run_stage(name, cfg[name], workdir, data_paths)
    table = evaluate_checkpoints(cfg, workdir, data_paths)
    lines = ["| checkpoint | held-out mean score | submit rate | turns | tokens |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row.get('mean_score', np.nan):.4f} | {row.get('submit_rate', np.nan):.2f} | "
                     f"{row.get('mean_turns', np.nan):.1f} | {row.get('mean_sampled_tokens', np.nan):.0f} |")
    budgets = achievable_by_stage(cfg, workdir, data_paths)
    lines += ["", "| stage budget | timeout s | turns | achievable (expert replayed) |", "|---|---|---|---|"]
    for name, row in budgets.items():
        lines.append(f"| {name} | {row['timeout_s']:.0f} | {row['max_turns']} | {row['mean_score']:.4f} |")
    print("\n".join(lines), flush=True)
    summary = {"heldout": table, "achievable_by_stage": budgets}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {"summary": summary}
