"""The recipe's numbers across runs: held-out score per checkpoint for every pipeline workdir given, the ordering
base < SFT < RL stage 3 per run, and the progressive schedule against stage 3's budget alone.

  python tools/recipe_table.py runs/seed0 runs/seed1 runs/seed2 runs/s3only_seed0 ...

Reads each workdir's results.json (written by klong_jax/rl/pipeline.py; its `schedule` says which arm it is) and
each RL stage's metrics.jsonl (reward mean and spread per step, zero-variance groups, clip fraction, tokens per
episode). Prints markdown; reports every run given, none dropped.
"""
import json
import os
import statistics
import sys


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


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = [load(w) for w in argv]
    lines = ["| run | schedule | seed | base | SFT | RL stage 1 | RL stage 2 | RL stage 3 | base < SFT < RL3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h = {k: v.get("mean_score") for k, v in r["heldout"].items()}
        order = (h.get("base") is not None and h.get("sft") is not None and h.get("rl_stage3") is not None
                 and h["base"] < h["sft"] < h["rl_stage3"])
        lines.append(f"| {r['workdir']} | {r.get('schedule', 'progressive')} | {r['seed']} | {_fmt(h.get('base'))} | "
                     f"{_fmt(h.get('sft'))} | {_fmt(h.get('rl_stage1'))} | {_fmt(h.get('rl_stage2'))} | "
                     f"{_fmt(h.get('rl_stage3'))} | {'yes' if order else 'no'} |")
    for schedule in sorted({r.get("schedule", "progressive") for r in runs}):
        final = [r["heldout"]["rl_stage3"]["mean_score"] for r in runs
                 if r.get("schedule", "progressive") == schedule and "rl_stage3" in r["heldout"]]
        if final:
            spread = statistics.pstdev(final) if len(final) > 1 else 0.0
            lines.append(f"\n{schedule}: RL stage 3 held-out score over {len(final)} run(s): "
                         f"mean {statistics.fmean(final):.3f}, std {spread:.3f}")
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
