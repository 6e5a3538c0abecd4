"""The whole KLong recipe: a zero-shot held-out evaluation of the base, trajectory-splitting SFT, then RL stages
1..3 with growing episode timeouts, each stage followed by the held-out evaluation of its checkpoint; then the
expert's replay under each stage's budget (the ceiling) and the results table. Each stage lives in its own
sub-workdir; a finished stage (summary.json written) is skipped and an unfinished one resumes from its checkpoint,
so rerunning the same command after an interruption continues where it stopped."""
import json
import os
import time

import jax
import numpy as np

from klong_jax.agent import AgentConfig, RolloutConfig, ScriptedPolicy, evaluate
from klong_jax.agent.evaluate import SUMMARY_FILE, paired_difference, task_scores
from klong_jax.agent.runner import clock_text
from klong_jax.agent.sampler_policy import SamplerPolicy
from klong_jax.data.chat_template import make_chat_template
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.data.trajectory import read_jsonl
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.rl.config import RLConfig
from klong_jax.rl.loop import load_tasks, run_rl
from klong_jax.sharding import make_mesh
from klong_jax.training.sft import run_sft
from klong_jax.training.state import initial_model, load_trained_model

STAGES = ("sft", "rl_stage1", "rl_stage2", "rl_stage3")
# config.schedule -> the stages run after each other (each RL stage starts from the previous stage's weights).
SCHEDULES = {"progressive": STAGES, "stage3_only": ("sft", "rl_stage3")}
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


def evaluate_checkpoint(name, cfg, workdir, data_paths) -> dict:
    """Held-out evaluation of one checkpoint: `base` (the SFT stage's starting weights: its init_from, upcycled
    as configured, or random) or a stage's final checkpoint. Returns the summary numbers (mean score and spread,
    leaf pass rate, submit rate, turns, tokens) and the rollout's timings (wall seconds, prefill tokens).
    A finished evaluation (eval_summary.json newer than the stage's summary.json) is read back, not rerun."""
    eval_dir = os.path.join(workdir, "eval", name)
    done = os.path.join(eval_dir, SUMMARY_FILE)
    stage_done = os.path.join(workdir, name, "summary.json")
    if os.path.exists(done) and not (os.path.exists(stage_done) and
                                     os.path.getmtime(stage_done) > os.path.getmtime(done)):
        # Evaluated before an interruption, and the stage has not been run again since.
        with open(done) as f:
            report = json.load(f)
        row = _row(report)
        print(f"[pipeline] held-out {name}: mean score {row.get('mean_score', float('nan')):.4f} "
              f"(evaluated before, {done})", flush=True)
        return row
    model_cfg = model_config_from(cfg.sft.model)
    mesh = make_mesh(dict(cfg.sft.mesh.shape))
    template = make_chat_template(load_tokenizer(data_paths["tokenizer"]), cfg.sft.data.get("chat_template", "auto"))
    tasks = load_tasks(data_paths["heldout_tasks"], cfg.eval.n_tasks)
    agent_cfg = AgentConfig.from_mapping(cfg.eval.agent, context=cfg.sft.data.pipeline.context)
    print(f"[pipeline] held-out {name}: {len(tasks) * cfg.eval.n_per_task} episodes, greedy, "
          f"{agent_cfg.max_turns} turns at most", flush=True)
    with jax.set_mesh(mesh):
        if name == "base":
            model = initial_model(model_cfg, mesh, init_from=cfg.sft.init_from, seed=cfg.sft.seed,
                                  upcycle=upcycle_config_from(cfg.sft.model))
        else:
            model, _ = load_trained_model(os.path.join(workdir, name), model_cfg, mesh)
        buckets = SamplerPolicy.rollout_buckets(agent_cfg, min(EVAL_CONCURRENCY, len(tasks) * cfg.eval.n_per_task),
                                                template)
        policy = SamplerPolicy.from_model(model, mesh, seed=cfg.eval.seed,
                                          rollout=RolloutConfig.from_mapping(cfg.sft.get("rollout")), **buckets)
        report, _ = evaluate(tasks, policy, template=template, config=agent_cfg, workdir=eval_dir,
                             n_per_task=cfg.eval.n_per_task, tag=f"{name}-", max_concurrent=EVAL_CONCURRENCY,
                             print_fn=_eval_printer(name))
    row = _row(report)
    print(f"[pipeline] held-out {name}: mean score {row.get('mean_score', float('nan')):.4f}", flush=True)
    return row


def _row(report: dict) -> dict:
    """An evaluation's numbers: its summary, its rollout timings (sampling_s, prefill_tokens, reused_tokens) and
    each task's mean score (`task_scores`: what the paired comparisons between checkpoints read)."""
    return {**_numbers(report["summary"]), **{f"rollout_{k}": v for k, v in report.get("timings", {}).items()},
            "task_scores": task_scores(report)}


def comparisons(heldout: dict, stages) -> dict:
    """Paired held-out differences (agent.evaluate.paired_difference) between checkpoints evaluated on the same
    tasks: each checkpoint against the one before it (base -> sft -> rl_stage1 -> ...) and, when RL ran, the last
    RL stage against SFT (the acceptance's claim). Keys "after - before"; a row without task scores is skipped."""
    names = [n for n in ("base",) + tuple(stages) if n in heldout and heldout[n].get("task_scores")]
    pairs = list(zip(names, names[1:]))
    rl = [n for n in names if n.startswith("rl_")]
    if "sft" in names and rl and ("sft", rl[-1]) not in pairs:
        pairs.append(("sft", rl[-1]))
    return {f"{after} - {before}": paired_difference(heldout[before]["task_scores"], heldout[after]["task_scores"])
            for before, after in pairs}


def _eval_printer(name: str):
    """Progress of a held-out evaluation: the step lines (with their ETA) and each finished episode; the
    per-task table is left to eval_summary.json."""
    def show(line: str) -> None:
        if line.startswith("[eval]") or ": score " in line:
            print(f"[pipeline] eval {name}: {line.removeprefix('[eval] ')}", flush=True)
    return show


def achievable_by_stage(cfg, workdir, data_paths, stages) -> dict:
    """Held-out score of the scripted expert's recorded trajectories replayed through the agent under each
    stage's budget (timeout, turns, tokens): what a stage's budget lets a policy achieve at best. A stage
    whose budget ends an episode before the work is done caps the score its rollouts can earn."""
    template = make_chat_template(load_tokenizer(data_paths["tokenizer"]), cfg.sft.data.get("chat_template", "auto"))
    tasks = load_tasks(data_paths["heldout_tasks"], cfg.eval.n_tasks)
    wanted = {t.task_id for t in tasks}
    experts = [t for path in data_paths["eval"] for t in read_jsonl(path) if t.task_id in wanted]
    table = {}
    for name in stages:
        agent_cfg = AgentConfig.from_mapping(cfg[name].agent, context=cfg.sft.data.pipeline.context)
        report, _ = evaluate(tasks, ScriptedPolicy.from_trajectories(template, experts), template=template,
                             config=agent_cfg, workdir=os.path.join(workdir, "eval", f"expert_{name}"),
                             tag=f"expert-{name}-", print_fn=None, max_concurrent=EVAL_CONCURRENCY)
        table[name] = {"timeout_s": agent_cfg.timeout_s, "max_turns": agent_cfg.max_turns,
                       "max_total_tokens": agent_cfg.max_total_tokens, **_numbers(report["summary"])}
        print(f"[pipeline] {name} budget ({agent_cfg.timeout_s:.0f} s, {agent_cfg.max_turns} turns, "
              f"{agent_cfg.max_total_tokens} tokens): the expert replayed scores {table[name]['mean_score']:.4f} "
              "on held-out tasks", flush=True)
    return table


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def stages_of(cfg) -> tuple[str, ...]:
    """The training stages the pipeline runs: SFT then RL stages 1, 2, 3 (`progressive`), or SFT then stage 3's
    budget alone (`stage3_only`, the ablation; configs/klong.py gives it as many rollout episodes)."""
    schedule = cfg.get("schedule", "progressive")
    if schedule not in SCHEDULES:
        raise ValueError(f"config.schedule={schedule!r}: choose one of {tuple(SCHEDULES)}")
    return SCHEDULES[schedule]


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


def results_table(heldout: dict, budgets: dict, paired: dict | None = None) -> str:
    """The demo's tables: every checkpoint on the held-out tasks, the paired differences between checkpoints
    (`comparisons`: whether a difference is larger than the held-out set can resolve), and the expert's ceiling
    per stage budget."""
    lines = ["| checkpoint | held-out score (mean ± std over episodes) | leaf pass rate | submit rate | turns | "
             "tokens | prompt tokens prefilled / reused from the KV cache |", "|---|---|---|---|---|---|---|"]
    for name, row in heldout.items():
        lines.append(f"| {name} | {row.get('mean_score', np.nan):.3f} ± {row.get('score_std', np.nan):.3f} | "
                     f"{row.get('leaf_pass_rate', np.nan):.3f} | {row.get('submit_rate', np.nan):.2f} | "
                     f"{row.get('mean_turns', np.nan):.1f} | {row.get('mean_sampled_tokens', np.nan):.0f} | "
                     f"{row.get('rollout_prefill_tokens', np.nan):.0f} / "
                     f"{row.get('rollout_reused_tokens', np.nan):.0f} |")
    if paired:
        lines += ["", "| paired on the same held-out tasks | tasks | mean difference ± standard error | "
                  "interval (± 2 se) | tasks up / down / same | verdict | smallest resolvable difference |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in paired.items():
            if p["se"] is None:        # fewer than 2 tasks: no spread, nothing resolved
                lines.append(f"| {name} | {p['tasks']} | {_signed(p['mean'])} | - | {p['up']} / {p['down']} / "
                             f"{p['same']} | {p['verdict']} | - |")
                continue
            lines.append(f"| {name} | {p['tasks']} | {p['mean']:+.3f} ± {p['se']:.3f} | "
                         f"[{p['low']:+.3f}, {p['high']:+.3f}] | {p['up']} / {p['down']} / {p['same']} | "
                         f"{p['verdict']} | {p['resolvable']:.3f} |")
    lines += ["", "| stage budget | timeout s | turns | tokens | expert replayed: score | leaf pass rate |",
              "|---|---|---|---|---|---|"]
    for name, row in budgets.items():
        lines.append(f"| {name} | {row['timeout_s']:.0f} | {row['max_turns']} | {row['max_total_tokens']} | "
                     f"{row['mean_score']:.3f} | {row.get('leaf_pass_rate', np.nan):.3f} |")
    return "\n".join(lines)


class _PhaseClock:
    """Wall seconds of each phase run by this invocation, kept in workdir/phases.json (this class owns the file);
    a phase skipped because it finished earlier keeps the seconds recorded then."""

    def __init__(self, workdir: str, phases: list[str]):
        self.path = os.path.join(workdir, "phases.json")
        self.phases = phases
        self.wall_s: dict = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.wall_s = json.load(f)
        self.started = time.perf_counter()

    def run(self, name: str, fn):
        k = self.phases.index(name) + 1
        print(f"[pipeline] phase {k}/{len(self.phases)}: {name} (pipeline elapsed {clock_text(self.elapsed())})",
              flush=True)
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        if seconds > 1.0 or name not in self.wall_s:   # a skipped phase (well under a second) keeps its record
            self.wall_s[name] = round(seconds, 1)
            if jax.process_index() == 0:
                with open(self.path, "w") as f:
                    json.dump(self.wall_s, f, indent=2)
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_pipeline(cfg, workdir: str, data_paths: dict) -> dict:
    """Zero-shot evaluation of the base, then each stage followed by the held-out evaluation of its checkpoint,
    then the expert's replay under each RL stage's budget; prints the tables, writes results.json."""
    stages = stages_of(cfg)
    for name in stages:   # every stage's rl and agent sections checked before the first phase spends any time
        if name.startswith("rl_"):
            RLConfig.from_mapping(cfg[name].rl)
            AgentConfig.from_mapping(cfg[name].agent, context=cfg.sft.data.pipeline.context)
    phases = ["eval base"] + [p for s in stages for p in (s, f"eval {s}")] + ["expert replay"]
    clock = _PhaseClock(workdir, phases)
    heldout = {"base": clock.run("eval base", lambda: evaluate_checkpoint("base", cfg, workdir, data_paths))}
    for name in stages:
        clock.run(name, lambda: run_stage(name, cfg[name], workdir, data_paths))
        heldout[name] = clock.run(f"eval {name}", lambda: evaluate_checkpoint(name, cfg, workdir, data_paths))
    budgets = clock.run("expert replay", lambda: achievable_by_stage(
        cfg, workdir, data_paths, [s for s in stages if s.startswith("rl_")]))
    paired = comparisons(heldout, stages)
    print(results_table(heldout, budgets, paired), flush=True)
    print("[pipeline] wall time per phase: " + ", ".join(f"{k} {clock_text(v)}" for k, v in clock.wall_s.items()),
          flush=True)
    summary = {"schedule": cfg.get("schedule", "progressive"), "heldout": heldout, "paired": paired,
               "achievable_by_stage": budgets, "wall_s": dict(clock.wall_s)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {"summary": summary}
