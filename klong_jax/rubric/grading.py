"""Grading a rubric tree: judges score the leaves, weighted means score the parents.

A leaf's score is 0 or 1 from the first judge that accepts it. A leaf whose grading failed scores 0
and is marked invalid (valid = False); invalid leaves are counted in the summary, never hidden. A
parent's score is sum(w_i * s_i) / sum(w_i) over its children, 0 when the weights sum to 0; a parent is
valid when all its children are.

Verdicts are stored and looked up by node key (RubricNode.key: the node's position in its rubric file),
never by id: official rubrics repeat some ids, and each such leaf still gets its own verdict and weight.
Results keep the id as written, carry the key, and mark nodes whose id repeats (`duplicate_id`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Protocol, Sequence

from klong_jax.rubric.tree import RubricNode, duplicate_ids, ensure_keys


@dataclasses.dataclass(frozen=True)
class GradingContext:
    """What judges know about the episode being graded.

    episode_dir: the submission (the agent's working directory after the episode).
    task: the task statement the agent was given (the LLM judge shows it; bounded there).
    reproduction_touched_files: whether the reproduction run modified any file (see
      files_touched()); False triggers the PaperBench rule that Result-Analysis leaves score 0.
      None means unknown, and the rule is not applied.
    """

    episode_dir: str
    task: str = ""
    reproduction_touched_files: bool | None = None


@dataclasses.dataclass(frozen=True)
class LeafVerdict:
    score: float   # 0.0 or 1.0
    valid: bool
    explanation: str
    judge: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class Judge(Protocol):
    name: str

    def accepts(self, leaf: RubricNode) -> bool:
        """Whether this judge can grade `leaf`."""

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        """Grades `leaf`; reports its own failures as an invalid verdict rather than raising."""


@dataclasses.dataclass
class GradeResult:
    id: str
    requirements: str
    weight: int
    score: float
    valid: bool
    explanation: str
    task_category: str | None = None
    finegrained_task_category: str | None = None
    judge: str | None = None
    graded: bool = True  # False for leaves skipped because their weight in the tree is 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    key: str = ""               # the node's key (position in the rubric file): unique, unlike ids
    duplicate_id: bool = False  # another node of the graded tree has the same id
    children: list["GradeResult"] = dataclasses.field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def walk(self) -> Iterator["GradeResult"]:
        yield self
        for child in self.children:
            yield from child.walk()

    def leaves(self) -> Iterator["GradeResult"]:
        return (node for node in self.walk() if node.is_leaf)

    def summary(self) -> dict[str, Any]:
        """Score, leaf pass rate, invalid count, and the same per task category and per fine-grained
        category; `duplicate_ids`: the ids held by several nodes (each still graded on its own). Pass
        rates count graded leaves only."""
        def stats(leaves: list[GradeResult]) -> dict[str, Any]:
            graded = [leaf for leaf in leaves if leaf.graded]
            passed = sum(1 for leaf in graded if leaf.score >= 1.0)
            return {"leaves": len(leaves), "graded": len(graded), "passed": passed,
                    "invalid": sum(1 for leaf in graded if not leaf.valid),
                    "pass_rate": passed / len(graded) if graded else 0.0}

        leaves = list(self.leaves())
        per_category: dict[str, list[GradeResult]] = {}
        per_finegrained: dict[str, list[GradeResult]] = {}
        for leaf in leaves:
            per_category.setdefault(leaf.task_category or "None", []).append(leaf)
            per_finegrained.setdefault(leaf.finegrained_task_category or "None", []).append(leaf)
        repeated = sorted({node.id for node in self.walk() if node.duplicate_id})
        return {"score": self.score, "valid": self.valid, **stats(leaves), "duplicate_ids": repeated,
                "per_task_category": {k: stats(v) for k, v in sorted(per_category.items())},
                "per_finegrained_category": {k: stats(v) for k, v in sorted(per_finegrained.items())}}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "children"}
        out["children"] = [child.to_dict() for child in self.children]
        return out


class RecordedJudge:
    """Grades from recorded verdicts, e.g. the leaves of an earlier grading, so a tree can be re-scored
    (under a variant, or after fixing weights) without judging again.

    verdicts: by leaf key (RubricNode.key, GradeResult.key; what from_result records) or by leaf id. A
    leaf takes the verdict of its key if there is one, else that of its id (which then applies to every
    leaf with that id); a leaf with neither is invalid."""

    name = "recorded"

    def __init__(self, verdicts: dict[str, LeafVerdict]):
        self.verdicts = dict(verdicts)

    @classmethod
    def from_result(cls, result: GradeResult) -> "RecordedJudge":
        """The graded leaves of `result`, by key: leaves with a repeated id keep their own verdicts."""
        return cls({leaf.key or leaf.id: LeafVerdict(leaf.score, leaf.valid, leaf.explanation,
                                                     leaf.judge or cls.name, dict(leaf.metadata))
                    for leaf in result.leaves() if leaf.graded})

    def accepts(self, leaf: RubricNode) -> bool:
        return True

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        for name in (leaf.key, leaf.id):
            if name and name in self.verdicts:
                return self.verdicts[name]
        return LeafVerdict(0.0, False, f"no recorded verdict for leaf {leaf.id!r} (key {leaf.key!r})",
                           self.name)


def grade(rubric: RubricNode, judges: Judge | Sequence[Judge], context: GradingContext, *,
          max_workers: int = 1, skip_zero_weight: bool = True) -> GradeResult:
    """Grades every leaf of `rubric` with the first judge in `judges` that accepts it, and aggregates.

    skip_zero_weight: leaves whose weight, or an ancestor's, is 0 cannot change the score; they are not
      sent to a judge (score 0, valid, graded = False).
    max_workers: leaves graded concurrently (judges must then be thread-safe; the provided ones are).
    """
    judge_list = [judges] if hasattr(judges, "judge") else list(judges)
    if not judge_list:
        raise ValueError("grade() needs at least one judge")
    rubric = ensure_keys(rubric)
    to_grade: list[RubricNode] = []
    skipped: set[str] = set()
    # The root's own weight has no siblings to be relative to: it never zeroes the tree.
    for leaf, effective_zero in _leaves_with_zero_flag(rubric, False, is_root=True):
        (skipped.add(leaf.key) if skip_zero_weight and effective_zero else to_grade.append(leaf))

    def grade_leaf(leaf: RubricNode) -> LeafVerdict:
        if leaf.task_category == "Result Analysis" and context.reproduction_touched_files is False:
            return LeafVerdict(0.0, True, "the reproduction touched no files: Result Analysis scores 0",
                               "rule:no-files-touched")
        for judge in judge_list:
            if judge.accepts(leaf):
                try:
                    verdict = judge.judge(leaf, context)
                except Exception as e:  # a judge bug must not silently zero the leaf
                    return LeafVerdict(0.0, False, f"judge {judge.name} raised {type(e).__name__}: {e}",
                                       judge.name)
                if verdict.score not in (0.0, 1.0):
                    return LeafVerdict(0.0, False, f"judge {judge.name} returned score "
                                       f"{verdict.score!r}, not 0 or 1", judge.name)
                return verdict
        return LeafVerdict(0.0, False, "no judge accepts this leaf "
                           f"(judges: {[j.name for j in judge_list]})", "none")

    if max_workers > 1 and len(to_grade) > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            verdicts = dict(zip((leaf.key for leaf in to_grade), pool.map(grade_leaf, to_grade)))
    else:
        verdicts = {leaf.key: grade_leaf(leaf) for leaf in to_grade}
    return _aggregate(rubric, verdicts, skipped, set(duplicate_ids(rubric)))


def _leaves_with_zero_flag(node: RubricNode, zero_above: bool, is_root: bool = False):
    zero = zero_above or (node.weight == 0 and not is_root)
    if node.is_leaf:
        yield node, zero
    for child in node.sub_tasks:
        yield from _leaves_with_zero_flag(child, zero)


def _aggregate(node: RubricNode, verdicts: dict[str, LeafVerdict], skipped: set[str],
               repeated: set[str]) -> GradeResult:
    """The result tree; `verdicts` and `skipped` are by node key, `repeated` holds the repeated ids."""
    common = dict(id=node.id, requirements=node.requirements, weight=node.weight,
                  task_category=node.task_category,
                  finegrained_task_category=node.finegrained_task_category,
                  key=node.key, duplicate_id=node.id in repeated)
    if node.is_leaf:
        if node.key in skipped:
            return GradeResult(score=0.0, valid=True, explanation="not graded: weight 0 in this tree",
                               graded=False, **common)
        v = verdicts[node.key]
        return GradeResult(score=v.score, valid=v.valid, explanation=v.explanation, judge=v.judge,
                           metadata=dict(v.metadata), **common)
    children = [_aggregate(child, verdicts, skipped, repeated) for child in node.sub_tasks]
    total_weight = sum(child.weight for child in children)
    score = (sum(child.weight * child.score for child in children) / total_weight
             if total_weight > 0 else 0.0)
    invalid = sum(1 for child in children for leaf in child.leaves() if not leaf.valid)
    explanation = f"weighted mean of {len(children)} children (total weight {total_weight})"
    if invalid:
        explanation += f"; {invalid} invalid leaf grading(s) below"
    return GradeResult(score=score, valid=invalid == 0, explanation=explanation, children=children,
                       **common)


def snapshot_files(directory: str) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under `directory`, to tell later whether a run touched any."""
    snapshot = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            snapshot[os.path.relpath(path, directory)] = (st.st_mtime_ns, st.st_size)
    return snapshot


def files_touched(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> bool:
    """Whether any file was created, deleted or modified between two snapshots."""
    return before != after
