"""What every section kind shares: expert actions, planned mistakes, rubric nodes and name drawing.

A section kind is a module with five functions (see kinds/__init__.py):
  make(rng, names, n_items, difficulty) -> section dict (JSON-serialisable parameters, with "kind")
  spec(section, number) -> the Markdown text of the section in the task's prefix document
  initial_files(section) -> {relative path: content} that exist before the agent starts
  rubric(section, number, new_id) -> the section's rubric node (PaperBench format, leaves with "check")
  plan(section, number) -> the expert's list of Actions that carries the section out
"""
import dataclasses
import random
import uuid
from typing import Any, Callable

from klong_jax.tasks import vocab

# PaperBench leaf categories (rubrics.md).
CODE_DEVELOPMENT = "Code Development"
CODE_EXECUTION = "Code Execution"
RESULT_ANALYSIS = "Result Analysis"
ENVIRONMENT = "Environment & Infrastructure Setup"
DATA_PREPARATION = "Data Processing & Preparation"
METHOD = "Method Implementation"
EVALUATION = "Evaluation, Metrics & Benchmarking"
PRESENTATION = "Logging, Analysis & Presentation"


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A plausible slip: the `wrong` calls (the last one fails visibly), an optional look around,
    then the planned call again with `repair_reasoning`."""
    wrong: tuple["Action", ...]
    inspect: "Action | None"
    repair_reasoning: str


@dataclasses.dataclass(frozen=True)
class Action:
    """One expert tool call. `expect` (when set) must equal the observation without its surrounding
    whitespace: a self-check that the generator's answer matches what really happens in the sandbox."""
    tool: str
    arguments: dict[str, Any]
    reasoning: str
    content: str = ""
    expect: str | None = None
    mistakes: tuple[Mistake, ...] = ()

    def with_reasoning(self, reasoning: str) -> "Action":
        return dataclasses.replace(self, reasoning=reasoning, mistakes=())


def bash(cmd: str, reasoning: str, **kwargs) -> Action:
    return Action("bash", {"cmd": cmd}, reasoning, **kwargs)


def uuid_source(rng: random.Random) -> Callable[[], str]:
    """Deterministic uuid4-shaped ids, so a task's rubric is identical for identical seeds."""
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def leaf(new_id: Callable[[], str], requirements: str, check: str, category: str,
         finegrained: str, weight: int = 1) -> dict[str, Any]:
    return {
        "id": new_id(),
        "requirements": requirements,
        "weight": weight,
        "sub_tasks": [],
        "task_category": category,
        "finegrained_task_category": finegrained,
        "check": check,
    }


def node(new_id: Callable[[], str], requirements: str, sub_tasks: list[dict],
         weight: int = 1) -> dict[str, Any]:
    return {
        "id": new_id(),
        "requirements": requirements,
        "weight": weight,
        "sub_tasks": sub_tasks,
        "task_category": None,
        "finegrained_task_category": None,
    }


class Names:
    """Draws names without repeats inside a scope (e.g. the directories of a task, or the files of
    one directory), so two sections never write the same directory, file or function."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._used: dict[str, set[str]] = {}

    def take(self, pool: tuple[str, ...], k: int = 1, scope: str = "task") -> list[str]:
        used = self._used.setdefault(scope, set())
        free = tuple(name for name in pool if name not in used)
        chosen = vocab.pick(self._rng, free, k)
        used.update(chosen)
        return chosen

    def one(self, pool: tuple[str, ...], scope: str = "task") -> str:
        return self.take(pool, 1, scope)[0]


def quote(text: str) -> str:
    """Single-quote `text` for bash; task words never contain a quote, which keeps commands short
    and regular for a tiny model."""
    if "'" in text:
        raise ValueError(f"task text must not contain a single quote: {text!r}")
    return f"'{text}'"
