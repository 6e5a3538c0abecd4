"""The recipe's numbers across runs: held-out score per checkpoint for every pipeline workdir given, the ordering
base < SFT < RL stage 3 per run, and the progressive schedule against stage 3's budget alone.

  python tools/recipe_table.py runs/seed0 runs/seed1 runs/seed2 runs/s3only_seed0 ...

Reads each workdir's results.json (written by klong_jax/rl/pipeline.py; its `schedule` says which arm it is), each
checkpoint's per-task held-out scores (results.json `task_scores`, or eval/<checkpoint>/eval_summary.json of runs
made before it had them) and each RL stage's metrics.jsonl (reward mean and spread per step, zero-variance groups,
clip fraction, tokens per episode). Differences are paired on the same held-out tasks
(klong_jax.agent.evaluate.paired_difference: mean ± standard error, and whether the interval of ± 2 se excludes 0):
per run RL stage 3 - SFT; per schedule the same pooled over its runs (each (run, task) one pair); and progressive
RL stage 3 - stage-3-only RL stage 3 for the seeds run in both arms. Prints markdown; reports every run given, none
dropped.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from klong_jax.agent.evaluate import SUMMARY_FILE, paired_difference, task_scores  # noqa: E402


def load(workdir: str) -> dict:
    path = os.path.join(workdir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing (has the pipeline in {workdir} finished?)") from None
    config_path = os.path.join(workdir, "config.json")
    seed = json.load(open(config_path)).get("seed", "?") if os.path.exists(config_path) else "?"
    return {"workdir": workdir, "seed": seed, **results}


def rl_rows(workdir: str, stage: str) -> list[dict]:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def scores_of(run: dict, name: str) -> dict[str, float] | None:
    """{task_id: held-out mean score} of checkpoint `name` in a run (None: not evaluated)."""
    row = run["heldout"].get(name)
    if row is None:
        return None
    if row.get("task_scores"):
        return row["task_scores"]
    path = os.path.join(run["workdir"], "eval", name, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return task_scores(json.load(f))


def _paired_text(p: dict | None) -> str:
    if p is None or not p["tasks"]:
        return "- | -"
    if p["se"] is None:     # one task: no spread
        return f"{p['mean']:+.3f} ({p['tasks']} task) | {p['verdict']}"
    return f"{p['mean']:+.3f} ± {p['se']:.3f} ({p['tasks']} tasks) | {p['verdict']}"


def _keyed(run: dict, name: str, key) -> dict:
    return {(key, t): v for t, v in (scores_of(run, name) or {}).items()}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = [load(w) for w in argv]
    lines = ["| run | schedule | seed | base | SFT | RL stage 1 | RL stage 2 | RL stage 3 | base < SFT < RL3 | "
             "RL3 - SFT paired (± se) | verdict (± 2 se) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h = {k: v.get("mean_score") for k, v in r["heldout"].items()}
        order = (h.get("base") is not None and h.get("sft") is not None and h.get("rl_stage3") is not None
                 and h["base"] < h["sft"] < h["rl_stage3"])
        sft, rl3 = scores_of(r, "sft"), scores_of(r, "rl_stage3")
        gain = paired_difference(sft, rl3) if sft and rl3 else None
        lines.append(f"| {r['workdir']} | {r.get('schedule', 'progressive')} | {r['seed']} | {_fmt(h.get('base'))} | "
                     f"{_fmt(h.get('sft'))} | {_fmt(h.get('rl_stage1'))} | {_fmt(h.get('rl_stage2'))} | "
                     f"{_fmt(h.get('rl_stage3'))} | {'yes' if order else 'no'} | {_paired_text(gain)} |")
    by_schedule: dict[str, list] = {}
    for r in runs:
        by_schedule.setdefault(r.get("schedule", "progressive"), []).append(r)
    for schedule, group in sorted(by_schedule.items()):
        final = [r["heldout"]["rl_stage3"]["mean_score"] for r in group if "rl_stage3" in r["heldout"]]
        if final:
            spread = statistics.pstdev(final) if len(final) > 1 else 0.0
            before = {k: v for i, r in enumerate(group) for k, v in _keyed(r, "sft", i).items()}
            after = {k: v for i, r in enumerate(group) for k, v in _keyed(r, "rl_stage3", i).items()}
            lines.append(f"\n{schedule}: RL stage 3 held-out score over {len(final)} run(s): "
                         f"mean {statistics.fmean(final):.3f}, std {spread:.3f}; RL3 - SFT pooled over the runs' "
                         f"tasks: {_paired_text(paired_difference(before, after)).replace(' | ', ', ')}")
    prog = {r["seed"]: r for r in by_schedule.get("progressive", [])}
    only = {r["seed"]: r for r in by_schedule.get("stage3_only", [])}
    both = sorted(set(prog) & set(only), key=str)
    if both:
        before = {k: v for s in both for k, v in _keyed(only[s], "rl_stage3", s).items()}
        after = {k: v for s in both for k, v in _keyed(prog[s], "rl_stage3", s).items()}
        lines.append(f"\nprogressive RL3 - stage3_only RL3, seeds {', '.join(map(str, both))} paired by seed and "
                     f"task: {_paired_text(paired_difference(before, after)).replace(' | ', ', ')}")
    lines += ["", "| run | stage | step | reward mean | reward std | zero-variance groups | clip fraction | "
              "tokens/episode | rollout s | update s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for stage in ("rl_stage1", "rl_stage2", "rl_stage3"):
            for m in rl_rows(r["workdir"], stage):
                groups = m.get("groups_total") or 0
                zero = m.get("groups_skipped", 0) / groups if groups else None
                lines.append(f"| {r['workdir']} | {stage} | {m.get('step')} | {_fmt(m.get('reward_mean'))} | "
                             f"{_fmt(m.get('reward_std'))} | {_fmt(zero, '.2f')} | {_fmt(m.get('clip_frac'))} | "
                             f"{_fmt(m.get('tokens_mean'), '.0f')} | {_fmt(m.get('rollout_time_s'), '.0f')} | "
                             f"{_fmt(m.get('update_time_s'), '.0f')} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
