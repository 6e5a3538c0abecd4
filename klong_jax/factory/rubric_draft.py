"""Drafting a paper's PaperBench rubric with a model behind a chat endpoint, top-down, validated by the loader.

    draft = draft_rubric(endpoint, paper_markdown, "Paper title", max_attempts=3)
    if draft.ok: json.dump(draft.rubric, f)            # a rubric.json that klong_jax.rubric.load_rubric reads
    else: draft.failed_step, draft.errors             # counted as failed, never written
    draft.attempts, draft.prompt_tokens, draft.completion_tokens, draft.to_dict()

Three kinds of steps, each one chat call answered with JSON (rubrics.md has the format):
  1. sections:      {"sections": [{"requirements": "...", "weight": 3}, ...]}
  2. per section:   {"subtasks": [{"requirements": "...", "weight": 1}, ...]}
  3. per subtask:   {"criteria": [{"requirements": "...", "task_category": "Code Development",
                                    "finegrained_task_category": "Method Implementation", "weight": 1}, ...]}
With `json_schema` (the default) each call also sends the step's JSON schema as `response_format` (`step_schema`:
the list under its key, at most the step's limit of items, each with a non-empty requirement, an integer weight
and, for criteria, the categories as enums), so a server that decodes under it (launch/serve.py, vLLM, SGLang,
OpenAI) can only answer in the shape asked for; the loader still checks every answer, and an answer cut at
max_tokens (finish_reason "length": under the schema a whole answer ends by itself) is rejected with that reason.
Each answer's JSON is taken from the text robustly (`extract_json`: a fenced block, a value after prose, a
`<think>` block skipped), its items are made rubric nodes with fresh uuid ids and loaded with
`klong_jax.rubric.parse_rubric` (sections and subtasks as not-yet-expanded "Subtree" leaves, criteria as the
leaves they are; a criterion must also name one of the three drafted categories and a finegrained category).
An answer that does not load is answered with the loader's error message ("root.sub_tasks[i]" is item i of
the list) and asked again, up to `max_attempts` answers per step; then the draft fails at that step, with
every error kept. A failed endpoint call (EndpointError after its own retries) fails the draft too. The
assembled tree root -> sections -> subtasks -> criteria is loaded once more as a whole before it is returned.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from klong_jax.rubric import FINEGRAINED_CATEGORIES, RubricError, parse_rubric
from klong_jax.rubric.evidence import cut_middle

DRAFT_CATEGORIES = ("Code Development", "Code Execution", "Result Analysis")

SYSTEM_PROMPT = (
    "You write grading rubrics for reproductions of research papers, in the PaperBench format. A rubric is a "
    "tree: the root is 'the paper is reproduced'; its children are the paper's main contributions or "
    "experiments (sections); each section splits into subtasks; each subtask into leaf criteria that a grader "
    "can check as pass/fail by reading the reproduction's code, logs and outputs. Weights are non-negative "
    "integers, relative to siblings (more important: larger). Leaf categories:\n"
    "- Code Development: the code implementing something specific is written (checked by reading the code);\n"
    "- Code Execution: the code was run and produced the expected artefacts (checked in logs and outputs);\n"
    "- Result Analysis: a result of the paper is reproduced and reported (checked against the paper's numbers).\n"
    "Finegrained categories: " + "; ".join(FINEGRAINED_CATEGORIES) + ".\n"
    "Answer with JSON only, in the shape asked for.")


class DraftJSONError(ValueError):
    """No JSON value could be read from a model's answer."""


def extract_json(text: str) -> Any:
    """The JSON value of a model's answer: the whole text, else the first fenced code block that parses
    (```json ... ``` or ``` ... ```), else the first object or list that parses where one starts in the text
    (leading prose, trailing remarks). `<think>...</think>` blocks are skipped. DraftJSONError otherwise."""
    body = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        pass
    for block in re.findall(r"```[a-zA-Z0-9_-]*[ \t]*\n(.*?)```", body, flags=re.S):
        try:
            return json.loads(block)
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", body):
        try:
            value, _ = decoder.raw_decode(body, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, (dict, list)):
            return value
    shown = body if len(body) <= 300 else body[:150] + " ... " + body[-150:]
    raise DraftJSONError(f"no JSON object in the answer (answer with the JSON only): {shown!r}")


@dataclasses.dataclass
class DraftStep:
    """One step of a draft: `name` ("sections", "subtasks[1]", "criteria[1.0]"), the chat calls it made
    (`attempts`; an endpoint call's own HTTP retries are not counted here but in the endpoint's stats) and
    the error of every rejected answer."""
    name: str
    attempts: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    ok: bool = False


@dataclasses.dataclass
class RubricDraft:
    """A draft's outcome. ok: `rubric` is a PaperBench rubric dict that `parse_rubric` loads (uuid ids).
    failure: "invalid" (a step's answers never loaded), "endpoint" (a chat call failed after its retries) or
    None; failed_step names the step. errors: every rejected answer's error and the endpoint's, in order.
    attempts: chat calls made; tokens from the answers' `usage`."""
    title: str
    ok: bool
    rubric: dict | None
    steps: list[DraftStep]
    failure: str | None = None
    failed_step: str | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def attempts(self) -> int:
        return sum(step.attempts for step in self.steps)

    @property
    def n_leaves(self) -> int:
        if self.rubric is None:
            return 0
        return sum(1 for node in parse_rubric(self.rubric).leaves())

    def to_dict(self) -> dict:
        return {"title": self.title, "ok": self.ok, "failure": self.failure, "failed_step": self.failed_step,
                "attempts": self.attempts, "errors": list(self.errors), "n_leaves": self.n_leaves,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "steps": [dataclasses.asdict(s) for s in self.steps]}


class _StepFailed(Exception):
    def __init__(self, kind: str):
        self.kind = kind


def _usage(reply: Any, key: str) -> int:
    value = (getattr(reply, "usage", None) or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _items(value: Any, key: str, limit: int) -> list:
    """The list under `key` of an answer (a bare list is accepted too); ValueError naming the problem."""
    items = value.get(key) if isinstance(value, dict) else value
    if not isinstance(items, list):
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f'expected {{"{key}": [...]}}, got {found}')
    if not items:
        raise ValueError(f'"{key}" is empty: give at least one item')
    if len(items) > limit:
        raise ValueError(f'"{key}" has {len(items)} items; give at most {limit}')
    return items


def _nodes(items: list, key: str, new_id: Callable[[], str], *, leaves: bool, title: str) -> list[dict]:
    """Rubric nodes of an answer's items, loaded with parse_rubric under a stand-in root; RubricError with the
    loader's message (plus the drafter's own category checks for leaves)."""
    nodes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RubricError(f'"{key}"[{i}] must be a JSON object, got {type(item).__name__}')
        node = {"id": new_id(), "requirements": item.get("requirements"), "weight": item.get("weight"),
                "sub_tasks": []}
        if leaves:
            node["task_category"] = item.get("task_category")
            node["finegrained_task_category"] = item.get("finegrained_task_category")
        else:   # not expanded yet: PaperBench's category for an approximated subtree
            node["task_category"] = "Subtree"
            node["finegrained_task_category"] = None
        nodes.append(node)
    parse_rubric({"id": "draft", "requirements": title, "weight": 1, "task_category": None,
                  "sub_tasks": nodes}, source=f'drafted "{key}" (root.sub_tasks[i] is item i)')
    if leaves:
        for i, node in enumerate(nodes):
            if node["task_category"] not in DRAFT_CATEGORIES:
                raise RubricError(f'drafted "{key}": item {i}: task_category must be one of '
                                  f'{list(DRAFT_CATEGORIES)}, got {node["task_category"]!r}')
            if node["finegrained_task_category"] not in FINEGRAINED_CATEGORIES:
                raise RubricError(f'drafted "{key}": item {i}: finegrained_task_category must be one of '
                                  f'{list(FINEGRAINED_CATEGORIES)}, got {node["finegrained_task_category"]!r}')
    return nodes


MAX_REQUIREMENT_CHARS = 600
MAX_WEIGHT = 100


def step_schema(key: str, limit: int, leaves: bool) -> dict:
    """The JSON schema of one drafting step's answer: {key: [item, ...]} with 1..limit items."""
    item: dict[str, Any] = {"requirements": {"type": "string", "minLength": 1, "maxLength": MAX_REQUIREMENT_CHARS}}
    if leaves:
        item["task_category"] = {"enum": list(DRAFT_CATEGORIES)}
        item["finegrained_task_category"] = {"enum": list(FINEGRAINED_CATEGORIES)}
    item["weight"] = {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT}
    return {"type": "object", "additionalProperties": False, "required": [key],
            "properties": {key: {"type": "array", "minItems": 1, "maxItems": limit,
                                 "items": {"type": "object", "properties": item, "required": list(item),
                                           "additionalProperties": False}}}}


def draft_rubric(endpoint: Any, paper_markdown: str, title: str, *, max_attempts: int = 3,
                 reference_code: str = "", max_paper_chars: int = 100_000, max_code_chars: int = 30_000,
                 max_sections: int = 8, max_subtasks: int = 8, max_criteria: int = 8,
                 max_tokens: int | None = 4096, temperature: float | None = None,
                 new_id: Callable[[], str] | None = None, json_schema: bool = True) -> RubricDraft:
    """Drafts the rubric of one paper (module docstring). endpoint: a ChatEndpoint (anything with
    `chat(messages, max_tokens=, temperature=, extra=) -> reply` with `content` and `usage`, raising on failure;
    `extra` carries the response_format when json_schema is True).
    paper_markdown / reference_code: cut in the middle to max_paper_chars / max_code_chars. max_attempts:
    answers per step (>= 1). max_sections / max_subtasks / max_criteria: list lengths accepted per step.
    new_id: id source (default: uuid4 strings). Never raises for a bad answer or a failing endpoint: the
    returned RubricDraft says what happened."""
    if max_attempts < 1:
        raise ValueError(f"draft_rubric max_attempts={max_attempts} must be >= 1")
    new_id = new_id or (lambda: str(uuid.uuid4()))
    draft = RubricDraft(title=title, ok=False, rubric=None, steps=[])
    paper = cut_middle(paper_markdown, max_paper_chars)
    context = f"# Paper: {title}\n\n{paper}"
    if reference_code:
        context += f"\n\n# The authors' reference code (excerpts)\n\n{cut_middle(reference_code, max_code_chars)}"

    def step(name: str, question: str, key: str, limit: int, leaves: bool) -> list[dict]:
        record = DraftStep(name)
        extra = ({"response_format": {"type": "json_schema", "json_schema": {
            "name": f"rubric_{key}", "schema": step_schema(key, limit, leaves)}}} if json_schema else None)
        draft.steps.append(record)
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": f"{context}\n\n# Your task\n{question}"}]
        for _ in range(max_attempts):
            record.attempts += 1
            try:
                reply = endpoint.chat(messages, max_tokens=max_tokens, temperature=temperature, extra=extra)
            except Exception as e:   # EndpointError after its retries, or a client that fails otherwise
                error = f"{name}: {type(e).__name__}: {e}"
                record.errors.append(error)
                draft.errors.append(error)
                raise _StepFailed("endpoint") from e
            draft.prompt_tokens += _usage(reply, "prompt_tokens")
            draft.completion_tokens += _usage(reply, "completion_tokens")
            try:
                if json_schema and getattr(reply, "finish_reason", None) == "length":
                    # Decoded under the schema, an answer stops only once its JSON is whole: this one was cut.
                    raise DraftJSONError(f"the answer reached max_tokens={max_tokens} before its JSON was complete "
                                         "(write shorter requirements, or fewer items)")
                nodes = _nodes(_items(extract_json(reply.content), key, limit), key, new_id, leaves=leaves,
                               title=title)
            except ValueError as e:   # DraftJSONError, RubricError and the list checks are ValueErrors
                record.errors.append(str(e))
                draft.errors.append(f"{name}: {e}")
                messages += [{"role": "assistant", "content": reply.content},
                             {"role": "user", "content": f"Your answer could not be loaded as a rubric: {e}\n"
                                                         "Answer again with the corrected JSON only."}]
                continue
            record.ok = True
            return nodes
        raise _StepFailed("invalid")

    category_text = (f'"task_category" one of {json.dumps(list(DRAFT_CATEGORIES))}, "finegrained_task_category" '
                     f"one of {json.dumps(list(FINEGRAINED_CATEGORIES))}")
    try:
        sections = step(
            "sections",
            f"List the main sections of the rubric for reproducing this paper (at most {max_sections}): its "
            "main contributions and experiments, each one requirement sentence with an integer weight. Answer "
            '{"sections": [{"requirements": "...", "weight": 1}, ...]}.', "sections", max_sections, False)
        for i, section in enumerate(sections):
            subtasks = step(
                f"subtasks[{i}]",
                f'Section {i + 1} of the rubric: "{section["requirements"]}". Split it into subtasks (at most '
                f"{max_subtasks}), each one requirement sentence with an integer weight. Answer "
                '{"subtasks": [{"requirements": "...", "weight": 1}, ...]}.', "subtasks", max_subtasks, False)
            for j, subtask in enumerate(subtasks):
                criteria = step(
                    f"criteria[{i}.{j}]",
                    f'Section {i + 1} of the rubric: "{section["requirements"]}"; its subtask {j + 1}: '
                    f'"{subtask["requirements"]}". Write the leaf criteria of this subtask (at most '
                    f"{max_criteria}): each one concrete pass/fail check, with {category_text} and an integer "
                    'weight. Answer {"criteria": [{"requirements": "...", "task_category": "Code Development", '
                    '"finegrained_task_category": "Method Implementation", "weight": 1}, ...]}.',
                    "criteria", max_criteria, True)
                subtask.update(task_category=None, finegrained_task_category=None, sub_tasks=criteria)
            section.update(task_category=None, finegrained_task_category=None, sub_tasks=subtasks)
    except _StepFailed as e:
        draft.failure, draft.failed_step = e.kind, draft.steps[-1].name
        return draft
    rubric = {"id": new_id(), "requirements": f"The paper '{title}' is reproduced", "weight": 1,
              "task_category": None, "finegrained_task_category": None, "sub_tasks": sections}
    try:
        parse_rubric(rubric, source=f"drafted rubric of {title!r}")
    except RubricError as e:   # each part loaded on its own; the whole must too
        draft.failure, draft.failed_step = "invalid", "assembly"
        draft.errors.append(f"assembly: {e}")
        return draft
    draft.ok, draft.rubric = True, rubric
    return draft


def draft_summary(drafts: Sequence[RubricDraft]) -> Mapping[str, Any]:
    """Counts over many drafts: ok, failed by kind, attempts and tokens (for a factory run's report)."""
    return {"drafts": len(drafts), "ok": sum(d.ok for d in drafts),
            "failed_invalid": sum(d.failure == "invalid" for d in drafts),
            "failed_endpoint": sum(d.failure == "endpoint" for d in drafts),
            "attempts": sum(d.attempts for d in drafts),
            "prompt_tokens": sum(d.prompt_tokens for d in drafts),
            "completion_tokens": sum(d.completion_tokens for d in drafts)}
