"""PaperBench-format rubric trees: loading, validation, and the Code-Dev and resources-provided
variants.

Node ids need not be unique: official PaperBench rubrics repeat some leaf ids (e.g. bbox,
bridging-data-gaps), and PaperBench's own loader accepts them. A node is identified by its `key`, its
position in the file it was parsed from ("/" for the root, "/1/0" for the first child of the root's
second child); grading stores and looks up verdicts by key, so every leaf gets its own verdict and
weight whatever its id. Variants keep the keys of the tree they were made from, so a grading of the full
tree can re-score a variant (RecordedJudge.from_result)."""
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
    # Position in the parsed file ("/", "/0", "/0/2"); "" for a node built by hand (ensure_keys() gives it
    # its position in the tree being graded). Not part of the file format nor of equality.
    key: str = dataclasses.field(default="", compare=False)

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


# How a Git LFS pointer file (the stand-in a clone without `git lfs` holds) starts.
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def read_text_file(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark is dropped). A missing or unreadable file, a
    directory, a Git LFS pointer or bytes that are not UTF-8 raise `error` with a message naming the file,
    what is wrong and the fix; `what` names the file's role in the message ("rubric", "paper")."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(f"{path}: no such file (the {what} file is missing)") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} file") from None
    except PermissionError:
        raise error(f"{path}: cannot read the {what} file: permission denied (make it readable by "
                    "this user)") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    if raw.startswith(LFS_POINTER_PREFIX):
        raise error(f"{path}: is a Git LFS pointer, not the {what} file itself (fetch the content, e.g. "
                    "`git lfs pull` in the repository it came from)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{path}: the {what} file is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset "
                    f"{e.start} (line {line}) is invalid (re-save the file as UTF-8)") from None


def load_rubric(path: str | os.PathLike) -> RubricNode:
    """Reads, parses and validates a rubric.json. Every failure, including a file that is missing,
    unreadable, a directory or not UTF-8, is a RubricError whose message starts with the path."""
    path = os.fspath(path)
    text = read_text_file(path, "rubric", RubricError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RubricError(f"{path}: not valid JSON: {e}") from e
    except RecursionError:
        raise RubricError(f"{path}: not valid JSON: nested too deeply") from None
    return parse_rubric(data, source=path)


def parse_rubric(data: Any, source: str = "<rubric>") -> RubricNode:
    """Builds and validates a tree from the decoded JSON of a rubric file. Every node's `key` is its
    position in `data`; ids may repeat (see the module docstring)."""
    return _parse_node(data, source, "root", "/")


def _child_key(parent_key: str, index: int) -> str:
    return f"{parent_key.rstrip('/')}/{index}"


def _parse_node(data: Any, source: str, where: str, key: str) -> RubricNode:
    def fail(message: str) -> RubricError:
        node_id = data.get("id") if isinstance(data, dict) else None
        named = f" (id {node_id!r})" if isinstance(node_id, str) else ""
        return RubricError(f"{source}: node {where}{named}: {message}")

    if not isinstance(data, dict):
        raise fail(f"must be a JSON object, got {type(data).__name__}")
    node_id = data.get("id")
    if not isinstance(node_id, str) or not node_id:
        raise fail(f"'id' must be a non-empty string, got {node_id!r}")
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
    children = [_parse_node(child, source, f"{where}.sub_tasks[{i}]", _child_key(key, i))
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
    return RubricNode(node_id, requirements, weight, children, category, finegrained, check, extra, key=key)


def ensure_keys(root: RubricNode) -> RubricNode:
    """`root` itself when every node has a key; otherwise a copy in which each node without one gets its
    position in this tree ("/", "/0", ...). Raises RubricError when two nodes share a key (a tree spliced
    from several parsed trees: give such nodes keys, or parse the combined tree)."""
    def fill(node: RubricNode, position: str) -> RubricNode:
        children = [fill(child, _child_key(position, i)) for i, child in enumerate(node.sub_tasks)]
        return dataclasses.replace(node, sub_tasks=children, key=node.key or position)

    keyed = root if all(node.key for node in root.walk()) else fill(root, "/")
    seen: dict[str, str] = {}
    for node in keyed.walk():
        if node.key in seen:
            raise RubricError(f"rubric {root.id!r}: nodes {seen[node.key]!r} and {node.id!r} share the key "
                              f"{node.key!r}; every node needs its own key to be graded")
        seen[node.key] = node.id
    return keyed


def duplicate_ids(root: RubricNode) -> dict[str, list[str]]:
    """Ids held by more than one node, each with the keys of its nodes in tree order."""
    by_id: dict[str, list[str]] = {}
    for node in ensure_keys(root).walk():
        by_id.setdefault(node.id, []).append(node.key)
    return {node_id: keys for node_id, keys in by_id.items() if len(keys) > 1}


def depth(root: RubricNode) -> int:
    """Levels in the tree: 1 for a single node."""
    return 1 + max((depth(child) for child in root.sub_tasks), default=0)


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
