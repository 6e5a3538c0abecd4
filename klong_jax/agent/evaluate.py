"""Evaluation: run the agent on a task set, grade every episode, summarise.

    report, results = evaluate(tasks, policy, template=template, config=agent_config, workdir=DIR)

writes DIR/episodes.jsonl (one trajectory per episode, in the data format, with the agent's meta
and the reward) as episodes finish, and DIR/eval_summary.json: `summary` (mean score and spread, leaf pass
rate, submit rate, timeouts, turns, tokens, ...), `timings` (rollout phases, prefill tokens), `per_task` and
`episodes` (every episode; one that ended before its
first turn has no assistant message, is not a valid trajectory, and is left out of episodes.jsonl);
the table is printed too. Callable from
the RL loop (held-out evaluation between stages) with the sampler policy of the current params.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
from collections.abc import Callable, Sequence

from klong_jax.agent.config import AgentConfig
from klong_jax.agent.policy import Policy
from klong_jax.agent.records import FINISH_REASONS, EpisodeResult
from klong_jax.agent.runner import run_episodes
from klong_jax.data.template_base import ChatTemplate
from klong_jax.sandbox import SandboxPool
from klong_jax.tasks.task import Task

SUMMARY_FILE = "eval_summary.json"
EPISODES_FILE = "episodes.jsonl"


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def leaf_pass_rate(results: Sequence[EpisodeResult]) -> float | None:
    """Rubric leaves passed / leaves graded, summed over the graded episodes (None: no episode was graded)."""
    return pooled_leaf_pass_rate([r.grade for r in results])


def pooled_leaf_pass_rate(grades) -> float | None:
    """`leaf_pass_rate` of episodes' grades ({"passed", "graded", ...} each, None for an ungraded episode)."""
    graded = [g for g in grades if g]
    if not graded:
        return None
    return sum(g["passed"] for g in graded) / max(sum(g["graded"] for g in graded), 1)


def aggregate(results: Sequence[EpisodeResult]) -> dict:
    """Scores and budgets of a set of episodes. An episode whose grading failed scores 0 here and
    is counted in `ungraded`; `invalid_gradings` counts those with a rubric leaf not graded.
    score_std: the population standard deviation of the episode scores; leaf_pass_rate: rubric leaves
    passed / leaves graded, summed over the graded episodes (sum passed / sum graded)."""
    reasons = collections.Counter(r.finish_reason for r in results)
    n = len(results)
    scores = [r.reward or 0.0 for r in results]
    return {
        "episodes": n,
        "mean_score": _mean(scores),
        # Spread of the episode scores (population standard deviation: 0 for one episode).
        "score_std": float(statistics.pstdev(scores)) if scores else 0.0,
        # Rubric leaves passed over leaves graded, pooled over the graded episodes.
        "leaf_pass_rate": leaf_pass_rate(results) or 0.0,
        "submit_rate": reasons["submit"] / n if n else 0.0,
        "timeouts": reasons["timeout"],
        "finish_reasons": {k: reasons[k] for k in FINISH_REASONS if reasons[k]},
        "mean_turns": _mean([len(r.turns) for r in results]),
        "mean_sampled_tokens": _mean([r.sampled_tokens for r in results]),
        "mean_elapsed_s": _mean([r.elapsed_s for r in results]),
        "ungraded": sum(1 for r in results if r.reward is None),
        "invalid_gradings": sum(1 for r in results if r.grade_valid is False),
        "errors": reasons["error"],
    }


def task_scores(report: dict) -> dict[str, float]:
    """{task_id: the task's mean episode score} of an evaluation report (`summarize`'s `per_task`)."""
    return {t["task_id"]: float(t["mean_score"]) for t in report["per_task"]}


# A difference counts as resolved when its interval mean +- RESOLVE_SE standard errors excludes 0 (~95%).
RESOLVE_SE = 2.0


def paired_difference(before: dict[str, float], after: dict[str, float]) -> dict:
    """`after` - `before` on the tasks both were evaluated on (task_id -> mean score each, `task_scores`).

    Paired, because the tasks differ far more from each other than two checkpoints differ on one task: with the
    per-task differences d_i = after_i - before_i over the n common tasks,
      mean = sum d_i / n,  sd = sqrt(sum (d_i - mean)^2 / (n - 1)),  se = sd / sqrt(n),
      interval = mean -+ RESOLVE_SE * se;  verdict: "gain" if the interval lies above 0, "loss" if below, else
      "noise" (n < 2: "noise", and sd, se, the interval and `resolvable` are None: no spread to measure);
      resolvable = RESOLVE_SE * sd / sqrt(n): the smallest |mean| this many tasks resolve at this spread
      (a smaller true effect needs (RESOLVE_SE * sd / effect)^2 tasks).
    up / down / same: tasks whose score rose, fell, stayed (|d_i| <= 1e-9)."""
    common = [t for t in before if t in after]
    d = [float(after[t]) - float(before[t]) for t in common]
    n = len(d)
    out = {"tasks": n, "mean": statistics.fmean(d) if d else None, "sd": None, "se": None, "low": None,
           "high": None, "verdict": "noise", "resolvable": None, "up": sum(x > 1e-9 for x in d),
           "down": sum(x < -1e-9 for x in d), "same": sum(abs(x) <= 1e-9 for x in d)}
    if n > 1:
        sd = statistics.stdev(d)
        se = sd / n ** 0.5
        lo, hi = out["mean"] - RESOLVE_SE * se, out["mean"] + RESOLVE_SE * se
        out.update(sd=sd, se=se, low=lo, high=hi, resolvable=RESOLVE_SE * se,
                   verdict="gain" if lo > 0 else "loss" if hi < 0 else "noise")
    return out


def summarize(results: Sequence[EpisodeResult], tasks: Sequence[Task]) -> dict:
    by_task = collections.defaultdict(list)
    for r in results:
        by_task[r.task_id].append(r)
    per_task = [{"task_id": t.task_id, "scores": [r.reward for r in by_task[t.task_id]],
                 **aggregate(by_task[t.task_id])} for t in tasks]
    return {"summary": {"tasks": len(tasks), **aggregate(results)}, "per_task": per_task,
            "episodes": [r.summary() for r in results]}


def format_table(report: dict) -> str:
    """Per-task rows and the overall row, fixed-width."""
    header = f"{'task':<28} {'eps':>4} {'score':>6} {'leaves':>6} {'submit':>6} {'tmout':>5} {'turns':>7} " \
             f"{'tokens':>9} {'secs':>7}"
    lines = [header, "-" * len(header)]

    def row(name: str, a: dict) -> str:
        return (f"{name[:28]:<28} {a['episodes']:>4} {a['mean_score']:>6.3f} {a['leaf_pass_rate']:>6.2f} "
                f"{a['submit_rate']:>6.2f} "
                f"{a['timeouts']:>5} {a['mean_turns']:>7.1f} {a['mean_sampled_tokens']:>9.1f} "
                f"{a['mean_elapsed_s']:>7.1f}")
    lines += [row(t["task_id"], t) for t in report["per_task"]]
    lines += ["-" * len(header), row("ALL", report["summary"])]
    s = report["summary"]
    lines.append(f"finish reasons: {s['finish_reasons']}; ungraded {s['ungraded']}, invalid "
                 f"gradings {s['invalid_gradings']}, errors {s['errors']}")
    return "\n".join(lines)


def evaluate(tasks: Sequence[Task], policy: Policy, *, template: ChatTemplate, config: AgentConfig,
             workdir: str, n_per_task: int = 1, pool: SandboxPool | None = None,
             max_concurrent: int = 8, keep_dirs: bool = False, tag: str = "",
             extra: dict | None = None, print_fn: Callable[[str], None] | None = print
             ) -> tuple[dict, list[EpisodeResult]]:
    """Runs and grades n_per_task episodes per task; returns (the report written to
    workdir/eval_summary.json, the episodes). `extra` is stored in the report (e.g. the checkpoint
    evaluated)."""
    if not tasks:
        raise ValueError("evaluate: no tasks")
    os.makedirs(workdir, exist_ok=True)
    pool = pool or SandboxPool(max_concurrent=max_concurrent)
    episodes_path = os.path.join(workdir, EPISODES_FILE)
    with open(episodes_path, "w", encoding="utf-8") as lines:
        def write(result: EpisodeResult) -> None:
            if result.turns:
                lines.write(result.to_json() + "\n")
                lines.flush()
            if print_fn is not None:
                print_fn(f"{result.episode_id}: score {result.reward} ({result.finish_reason}, "
                         f"{len(result.turns)} turns, {result.sampled_tokens} tokens)")

        timings: dict[str, float] = {}
        results = run_episodes(tasks, policy, n_per_task=n_per_task, template=template,
                               config=config, pool=pool, workdir=os.path.join(workdir, "episodes"),
                               tag=tag, keep_dirs=keep_dirs, on_result=write, timings=timings,
                               on_step=None if print_fn is None else lambda p: print_fn(f"[eval] {p.line()}"))
    report = summarize(results, tasks)
    report["config"] = config.to_dict()
    report["n_per_task"] = n_per_task
    # Wall seconds of the rollout's phases (sampling, tools, grading) and, for a policy that reports them, the
    # prompt tokens prefilled and those reused from its KV cache (run_episodes' timings).
    report["timings"] = timings
    if extra:
        report.update(extra)
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(report, f, indent=1)
    if print_fn is not None:
        print_fn(format_table(report))
    return report, results
