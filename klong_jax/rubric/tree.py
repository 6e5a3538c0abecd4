"""PaperBench-format rubric trees: loading, validation, and the Code-Dev and resources-provided
variants."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

LEAF_CATEGORIES = ("Code Development", "Code Execution", "Result Analysis", "Subtree")
FINEGRAINED_CATEGORIES = (
    "Environment & Infrastructure Setup", "Dataset and Model Acquisition",
    "Data Processing & Preparation", "Method Implementation", "Experimental Setup",
    "Evaluation, Metrics & Benchmarking", "Logging, Analysis & Presentation",
)
_KNOWN_FIELDS = ("id", "requirements", "weight", "sub_tasks", "task_category",
                 "finegrained_task_category", "check")


class RubricError(ValueError):
    """A rubric that does not follow the format; the message names the file and the node."""


@dataclasses.dataclass
class RubricNode:
    """One rubric node. A leaf has no sub_tasks and a task_category; `check` (an extension of the
    PaperBench format) is a shell command whose exit status 0 means the leaf is satisfied; `extra`
    keeps any other fields of the file unchanged."""

    id: str
    requirements: str
    weight: int
    sub_tasks: list["RubricNode"] = dataclasses.field(default_factory=list)
    task_category: str | None = None
    finegrained_task_category: str | None = None
    check: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.sub_tasks

    def walk(self) -> Iterator["RubricNode"]:
        yield self
        for child in self.sub_tasks:
            yield from child.walk()

    def leaves(self) -> Iterator["RubricNode"]:
        return (node for node in self.walk() if node.is_leaf)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(id=self.id, requirements=self.requirements, weight=self.weight,
                   sub_tasks=[c.to_dict() for c in self.sub_tasks], task_category=self.task_category,
                   finegrained_task_category=self.finegrained_task_category)
        if self.check is not None:
            out["check"] = self.check
        return out


def load_rubric(path: str | os.PathLike) -> RubricNode:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise RubricError(f"{path}: not valid JSON: {e}") from e
    return parse_rubric(data, source=path)


def parse_rubric(data: Any, source: str = "<rubric>") -> RubricNode:
    """Builds and validates a tree from the decoded JSON of a rubric file."""
    seen: dict[str, str] = {}
    return _parse_node(data, source, "root", seen)


def _parse_node(data: Any, source: str, where: str, seen: dict[str, str]) -> RubricNode:
    def fail(message: str) -> RubricError:
        node_id = data.get("id") if isinstance(data, dict) else None
        named = f" (id {node_id!r})" if isinstance(node_id, str) else ""
        return RubricError(f"{source}: node {where}{named}: {message}")

    if not isinstance(data, dict):
        raise fail(f"must be a JSON object, got {type(data).__name__}")
    node_id = data.get("id")
    if not isinstance(node_id, str) or not node_id:
        raise fail(f"'id' must be a non-empty string, got {node_id!r}")
    if node_id in seen:
        raise fail(f"duplicate id {node_id!r} (first at {seen[node_id]})")
    seen[node_id] = where
    requirements = data.get("requirements")
    if not isinstance(requirements, str):
        raise fail(f"'requirements' must be a string, got {requirements!r}")
    weight = data.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise fail(f"'weight' must be a non-negative integer, got {weight!r}")
    raw_children = data.get("sub_tasks")
    if raw_children is None:
        raw_children = []
    if not isinstance(raw_children, list):
        raise fail(f"'sub_tasks' must be a list or null, got {type(raw_children).__name__}")
    children = [_parse_node(child, source, f"{where}.sub_tasks[{i}]", seen)
                for i, child in enumerate(raw_children)]
    category = data.get("task_category")
    finegrained = data.get("finegrained_task_category")
    if finegrained is not None and not isinstance(finegrained, str):
        raise fail(f"'finegrained_task_category' must be a string or null, got {finegrained!r}")
    check = data.get("check")
    if not children:
        if category not in LEAF_CATEGORIES:
            raise fail(f"a leaf needs 'task_category' in {list(LEAF_CATEGORIES)}, got {category!r}")
        if check is not None and (not isinstance(check, str) or not check.strip()):
            raise fail(f"'check' must be a non-empty shell command string, got {check!r}")
    else:
        if category is not None and not isinstance(category, str):
            raise fail(f"'task_category' must be a string or null, got {category!r}")
        if check is not None:
            raise fail("'check' is only allowed on leaves")
    extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
    return RubricNode(node_id, requirements, weight, children, category, finegrained, check, extra)


def code_dev_variant(root: RubricNode) -> RubricNode:
    """PaperBench Code-Dev: only Code Development leaves are kept; internal nodes left without leaves
    are dropped. Returns a new tree."""
    pruned = _keep_leaves(root, lambda leaf: leaf.task_category == "Code Development")
    if pruned is None:
        raise RubricError(f"rubric {root.id!r} has no Code Development leaf: "
                          f"its Code-Dev variant is empty")
    return pruned


def _keep_leaves(node: RubricNode, keep) -> RubricNode | None:
    if node.is_leaf:
        return dataclasses.replace(node) if keep(node) else None
    children = [c for c in (_keep_leaves(child, keep) for child in node.sub_tasks) if c is not None]
    return dataclasses.replace(node, sub_tasks=children) if children else None


def resources_provided_variant(root: RubricNode) -> RubricNode:
    """PaperBench "resources provided": leaves about acquiring datasets and models get weight 0 (the
    resources are handed to the agent). Returns a new tree."""
    def rebuild(node: RubricNode) -> RubricNode:
        if node.is_leaf:
            zero = node.finegrained_task_category == "Dataset and Model Acquisition"
            return dataclasses.replace(node, weight=0 if zero else node.weight)
        return dataclasses.replace(node, sub_tasks=[rebuild(c) for c in node.sub_tasks])
    return rebuild(root)
