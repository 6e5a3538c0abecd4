"""Loads every PaperBench rubric.json under DIR with klong_jax.rubric, and every paper directory as a PaperTask.

    python tools/paperbench_rubrics.py DIR [--json=OUT.json]

DIR: e.g. frontier-evals/project/paperbench/data/papers (one directory per paper), or one paper directory.
Per paper: leaves, internal nodes, depth, ids held by several nodes (where: the node keys), whether an
all-pass grading scores 1 with one verdict per leaf (every leaf its own verdict, repeated ids included; a
`!` after the score when not), blacklist entries, and whether the directory loads as a PaperTask (or
which files stop it; the distinct problems are listed at the end). Exit status 1 when a rubric does not load.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from klong_jax.rubric import (GradingContext, LeafVerdict, RubricError, depth, duplicate_ids,  # noqa: E402
                              grade, load_rubric)
from klong_jax.rubric import read_text_file  # noqa: E402
from klong_jax.tasks.paperbench import PaperTaskError, load_paper_task, parse_blacklist  # noqa: E402


class _PassAll:
    """Passes every leaf, recording which leaf keys it was asked about."""

    name = "pass-all"

    def __init__(self):
        self.keys = []

    def accepts(self, leaf):
        return True

    def judge(self, leaf, context):
        self.keys.append(leaf.key)
        return LeafVerdict(1.0, True, "all-pass check", self.name)


def rubric_files(root: str) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        if "rubric.json" in files:
            found.append(os.path.join(directory, "rubric.json"))
    return found


def _label(problem: str, paper_dir: str) -> tuple[str, str]:
    """(the file a problem is about, relative to the paper directory, or "." for the directory; message)."""
    where, _, message = problem.partition(": ")
    return os.path.relpath(where, paper_dir) if where.startswith(paper_dir) else where, message


def check_paper(rubric_path: str) -> dict:
    paper_dir = os.path.dirname(rubric_path)
    row = {"paper": os.path.basename(paper_dir), "rubric": rubric_path}
    try:
        rubric = load_rubric(rubric_path)
    except RubricError as e:
        row["rubric_error"] = str(e)
    else:
        leaves = list(rubric.leaves())
        repeated = duplicate_ids(rubric)
        leaf_ids = {leaf.id for leaf in leaves}
        judge = _PassAll()
        result = grade(rubric, judge, GradingContext(paper_dir), skip_zero_weight=False)
        row.update(leaves=len(leaves), internal=sum(1 for n in rubric.walk() if not n.is_leaf),
                   depth=depth(rubric), duplicate_ids=repeated,
                   duplicate_leaf_ids=sorted(i for i in repeated if i in leaf_ids),
                   duplicate_internal_ids=sorted(i for i in repeated if i not in leaf_ids),
                   all_pass_score=result.score,
                   one_verdict_per_leaf=sorted(judge.keys) == sorted(leaf.key for leaf in leaves)
                   and len(set(judge.keys)) == len(leaves))
    try:
        row["blacklist"] = len(parse_blacklist(read_text_file(os.path.join(paper_dir, "blacklist.txt"),
                                                              "blacklist", PaperTaskError)))
    except PaperTaskError:
        pass   # reported by load_paper_task below
    try:
        task = load_paper_task(paper_dir)
    except PaperTaskError as e:
        row["paper_task_problems"] = [_label(problem, paper_dir) for problem in e.problems]
    else:
        row["paper_task"] = {"task_id": task.task_id, "blacklist": list(task.blacklist)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--json", default="", help="also write the per-paper rows to this file")
    args = parser.parse_args(argv)
    paths = rubric_files(args.dir)
    if not paths:
        print(f"{args.dir}: no rubric.json under it", file=sys.stderr)
        return 1
    rows = [check_paper(p) for p in paths]
    problems: dict[str, tuple[int, str]] = {}   # file -> (papers, the first message)
    for r in rows:
        for where, message in r.get("paper_task_problems", []):
            count, first = problems.get(where, (0, f"{r['paper']}/{where}: {message}"))
            problems[where] = (count + 1, first)
    print(f"{'paper':<44} {'leaves':>6} {'intern':>6} {'depth':>5} {'dup ids':>7} {'all-pass':>8} {'blacklist':>9}  "
          "paper task")
    for r in rows:
        own = r.get("paper_task_problems", [])
        task = "ok" if "paper_task" in r else f"{len(own)} problem(s): {', '.join(where for where, _ in own)}"
        if "rubric_error" in r:
            print(f"{r['paper'][:44]:<44} RUBRIC ERROR: {r['rubric_error']}")
            continue
        check = f"{r['all_pass_score']:.3f}" + ("" if r["one_verdict_per_leaf"] else "!")
        print(f"{r['paper'][:44]:<44} {r['leaves']:>6} {r['internal']:>6} {r['depth']:>5} "
              f"{len(r['duplicate_ids']):>7} {check:>8} {r.get('blacklist', '?'):>9}  {task}")
        for node_id, keys in r["duplicate_ids"].items():
            print(f"    repeated id {node_id!r} at {', '.join(keys)}")
    loaded = [r for r in rows if "rubric_error" not in r]
    tasks = sum(1 for r in rows if "paper_task" in r)
    with_dups = [r["paper"] for r in loaded if r["duplicate_ids"]]
    print(f"\n{len(rows)} papers: {len(loaded)} rubrics load, {sum(r['leaves'] for r in loaded)} leaves, "
          f"depth {min((r['depth'] for r in loaded), default=0)}-{max((r['depth'] for r in loaded), default=0)}; "
          f"repeated ids in {len(with_dups)} ({', '.join(with_dups) or '-'}): "
          f"{sum(len(r['duplicate_leaf_ids']) for r in loaded)} leaf ids, "
          f"{sum(len(r['duplicate_internal_ids']) for r in loaded)} internal ids; every leaf its own verdict: "
          f"{all(r['one_verdict_per_leaf'] for r in loaded)}; {tasks} load as PaperTasks")
    if problems:
        print("paper task problems, per file (`.`: the directory), with the first paper's message:")
        for where, (count, first) in problems.items():
            print(f"  {where}: {count} paper(s), e.g. {first}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if len(loaded) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
