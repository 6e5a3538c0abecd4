"""Paired held-out comparison of evaluations on the same tasks: each one against the first.

  python tools/paired_eval.py EVAL_SFT EVAL_RL [EVAL_RL2 ...]

Each argument is an evaluation directory written by launch/eval.py or the pipeline (its eval_summary.json) or that
file itself. Per argument after the first: the tasks both evaluated, mean score of each, the paired difference
(klong_jax.agent.evaluate.paired_difference: mean ± standard error over the per-task differences), the interval of
± 2 standard errors, tasks up / down / same, the verdict (gain / loss / noise) and the smallest difference these
tasks resolve at this spread. A task evaluated by only one of the two is left out of that pair and counted.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from klong_jax.agent.evaluate import SUMMARY_FILE, paired_difference, task_scores  # noqa: E402


def load_scores(path: str) -> dict[str, float]:
    """{task_id: mean score} of an evaluation directory or its eval_summary.json."""
    file = os.path.join(path, SUMMARY_FILE) if os.path.isdir(path) else path
    try:
        with open(file) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{file}: missing (an evaluation directory holds {SUMMARY_FILE})") from None
    if "per_task" not in report:
        raise SystemExit(f"{file}: no per_task scores (not an evaluation summary written by agent.evaluate)")
    return task_scores(report)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    first = load_scores(argv[0])
    lines = [f"before: {argv[0]} ({len(first)} tasks, mean {sum(first.values()) / max(len(first), 1):.3f})", "",
             "| after | tasks paired | before mean | after mean | difference ± se | interval (± 2 se) | "
             "up / down / same | verdict | smallest resolvable | unpaired tasks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in argv[1:]:
        other = load_scores(path)
        common = [t for t in first if t in other]
        p = paired_difference(first, other)
        unpaired = len(set(first) ^ set(other))
        mean_b = sum(first[t] for t in common) / max(len(common), 1)
        mean_a = sum(other[t] for t in common) / max(len(common), 1)
        spread = ("-", "-", "-") if p["se"] is None else (
            f"{p['mean']:+.3f} ± {p['se']:.3f}", f"[{p['low']:+.3f}, {p['high']:+.3f}]", f"{p['resolvable']:.3f}")
        lines.append(f"| {path} | {p['tasks']} | {mean_b:.3f} | {mean_a:.3f} | {spread[0]} | {spread[1]} | "
                     f"{p['up']} / {p['down']} / {p['same']} | {p['verdict']} | {spread[2]} | {unpaired} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
