"""Trajectory format: one agent episode per JSONL line, in the OpenAI chat shape.

    {"id": str, "task_id": str,
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning"?: str, "tool_calls"?: [{"id", "name", "arguments": {...}}],
                   "tool_call_id"?: str}, ...],
     "meta"?: {...}, "reward"?: number}

Validation reports every problem of a record at once, each naming its file, line and field
(`traj.jsonl:12: messages[3].tool_call_id: ...`). Structure rules (see `_check_structure`): messages
before the first assistant message form the prefix and are system/user messages with at least one user
message; a tool result answers a call of the assistant message right before it (only tool results in
between); every call is answered before the conversation moves on, except in the final assistant
message (an episode cut off by its timeout); no assistant message follows a call to an end tool
(`submit`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
END_TOOLS = ("submit",)
ON_ERROR_CHOICES = ("raise", "skip")

_TOP_KEYS = {"id", "task_id", "messages", "meta", "reward"}
_MESSAGE_KEYS = {"role", "content", "reasoning", "tool_calls", "tool_call_id"}
_CALL_KEYS = {"id", "name", "arguments"}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [dataclasses.asdict(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Trajectory:
    id: str
    task_id: str
    messages: tuple[Message, ...]
    meta: dict[str, Any] | None = None
    reward: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "task_id": self.task_id,
                               "messages": [m.to_dict() for m in self.messages]}
        if self.meta is not None:
            out["meta"] = self.meta
        if self.reward is not None:
            out["reward"] = self.reward
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class Issue:
    """One problem in one record: where it is (file, line, field) and what is wrong."""
    field: str
    message: str
    source: str = "<record>"
    line: int = 0

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def without_reasoning(trajectory: Trajectory) -> Trajectory:
    """The same trajectory with every assistant message's reasoning removed (content and calls kept): the
    model then learns to act without writing a `<think>` block, which a small model's budget of decoded and
    trained tokens may not afford."""
    messages = tuple(dataclasses.replace(m, reasoning=None) if m.reasoning is not None else m
                     for m in trajectory.messages)
    return dataclasses.replace(trajectory, messages=messages)


class TrajectoryError(ValueError):
    """A record that is not a valid trajectory; `issues` lists every problem found."""

    def __init__(self, issues: Sequence[Issue]):
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass
class SkipStats:
    """Counts what on_error='skip' dropped, by reason; every skip is also logged."""
    skipped: int = 0
    by_reason: Counter = field(default_factory=Counter)

    def record(self, error: Exception, where: str = "") -> None:
        self.skipped += 1
        self.by_reason[type(error).__name__] += 1
        logging.warning("skipping %s: %s", where or "record", error)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR_CHOICES}")


# ----------------------------------------------------------------------------------------------
# Parsing one record


def parse_line(raw: bytes | str, *, source: str = "<record>", line: int = 0,
               end_tools: Sequence[str] = END_TOOLS) -> Trajectory:
    """Decodes one JSONL line (bytes: strict UTF-8) and validates it; raises TrajectoryError."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrajectoryError([Issue("", f"invalid UTF-8 at byte {e.start} ({e.reason})",
                                         source, line)]) from None
    else:
        text = raw
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the line ends before the JSON value does: truncated?)" if e.pos >= len(
            text.rstrip()) else ""
        raise TrajectoryError([Issue("", f"invalid JSON at column {e.colno}: {e.msg}{hint}",
                                     source, line)]) from None
    return parse_trajectory(obj, source=source, line=line, end_tools=end_tools)


def parse_trajectory(obj: Any, *, source: str = "<record>", line: int = 0,
                     end_tools: Sequence[str] = END_TOOLS) -> Trajectory:
    """Validates a decoded JSON object and builds the Trajectory; raises TrajectoryError."""
    problems: list[tuple[str, str]] = []
    trajectory = _build(obj, problems)
    if trajectory is not None and not problems:
        _check_structure(trajectory.messages, problems, tuple(end_tools))
    if problems:
        raise TrajectoryError([Issue(f, m, source, line) for f, m in problems])
    assert trajectory is not None
    return trajectory


def validate_trajectory(obj: Any, *, end_tools: Sequence[str] = END_TOOLS) -> list[Issue]:
    """Every problem of a decoded record (empty when valid)."""
    try:
        parse_trajectory(obj, end_tools=end_tools)
    except TrajectoryError as e:
        return list(e.issues)
    return []


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_str(value: Any, name: str, problems: list, *, nonempty: bool = False) -> bool:
    if not isinstance(value, str):
        problems.append((name, f"expected a string, got {_type_name(value)}"))
        return False
    if nonempty and not value:
        problems.append((name, "must not be empty"))
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        problems.append((name, f"invalid Unicode at character {e.start} (lone surrogate)"))
        return False
    return True


def _check_json_strings(value: Any, name: str, problems: list) -> None:
    """Argument values may be any JSON; their strings must still be valid Unicode."""
    if isinstance(value, str):
        _check_str(value, name, problems)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json_strings(v, f"{name}.{k}", problems)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_strings(v, f"{name}[{i}]", problems)


def _build(obj: Any, problems: list) -> Trajectory | None:
    if not isinstance(obj, dict):
        problems.append(("", f"expected a JSON object, got {_type_name(obj)}"))
        return None
    for key in sorted(set(obj) - _TOP_KEYS):
        problems.append((key, "unknown field"))
    for key in ("id", "task_id"):
        if key not in obj:
            problems.append((key, "missing"))
        else:
            _check_str(obj[key], key, problems, nonempty=True)
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        problems.append(("meta", f"expected an object, got {_type_name(meta)}"))
    reward = obj.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not math.isfinite(reward)):
        problems.append(("reward", f"expected a finite number, got {reward!r}"))
    raw_messages = obj.get("messages")
    messages: list[Message] = []
    if raw_messages is None:
        problems.append(("messages", "missing"))
    elif not isinstance(raw_messages, list):
        problems.append(("messages", f"expected a list, got {_type_name(raw_messages)}"))
    elif not raw_messages:
        problems.append(("messages", "empty trajectory (no messages)"))
    else:
        for i, m in enumerate(raw_messages):
            msg = _build_message(m, f"messages[{i}]", problems)
            if msg is not None:
                messages.append(msg)
    if problems:
        return None
    return Trajectory(obj["id"], obj["task_id"], tuple(messages), meta,
                      None if reward is None else float(reward))


def _build_message(m: Any, name: str, problems: list) -> Message | None:
    if not isinstance(m, dict):
        problems.append((name, f"expected an object, got {_type_name(m)}"))
        return None
    n_before = len(problems)
    for key in sorted(set(m) - _MESSAGE_KEYS):
        problems.append((f"{name}.{key}", "unknown field"))
    role = m.get("role")
    if role not in ROLES:
        problems.append((f"{name}.role", f"unknown role {role!r}; expected one of {ROLES}"))
        return None
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""  # OpenAI writes null content for assistant messages that only call tools
    elif "content" not in m:
        problems.append((f"{name}.content", "missing"))
    else:
        _check_str(content, f"{name}.content", problems)
    reasoning = m.get("reasoning")
    if reasoning is not None:
        if role != "assistant":
            problems.append((f"{name}.reasoning", f"only assistant messages have reasoning, not {role}"))
        else:
            _check_str(reasoning, f"{name}.reasoning", problems)
    calls: list[ToolCall] = []
    raw_calls = m.get("tool_calls")
    if raw_calls is not None:
        if role != "assistant":
            problems.append((f"{name}.tool_calls", f"only assistant messages call tools, not {role}"))
        elif not isinstance(raw_calls, list):
            problems.append((f"{name}.tool_calls", f"expected a list, got {_type_name(raw_calls)}"))
        else:
            for k, c in enumerate(raw_calls):
                call = _build_call(c, f"{name}.tool_calls[{k}]", problems)
                if call is not None:
                    calls.append(call)
    call_id = m.get("tool_call_id")
    if role == "tool":
        if call_id is None:
            problems.append((f"{name}.tool_call_id", "missing (a tool result names the call it answers)"))
        else:
            _check_str(call_id, f"{name}.tool_call_id", problems, nonempty=True)
    elif call_id is not None:
        problems.append((f"{name}.tool_call_id", f"only tool messages have tool_call_id, not {role}"))
    if len(problems) > n_before:
        return None
    return Message(role, content, reasoning, tuple(calls), call_id)


def _build_call(c: Any, name: str, problems: list) -> ToolCall | None:
    if not isinstance(c, dict):
        problems.append((name, f"expected an object, got {_type_name(c)}"))
        return None
    n_before = len(problems)
    for key in sorted(set(c) - _CALL_KEYS):
        problems.append((f"{name}.{key}", "unknown field"))
    for key in ("id", "name"):
        if key not in c:
            problems.append((f"{name}.{key}", "missing"))
        else:
            _check_str(c[key], f"{name}.{key}", problems, nonempty=True)
    args = c.get("arguments")
    if not isinstance(args, dict):
        problems.append((f"{name}.arguments", f"expected an object, got {_type_name(args)}"))
    else:
        _check_json_strings(args, f"{name}.arguments", problems)
    if len(problems) > n_before:
        return None
    return ToolCall(c["id"], c["name"], args)


def _check_structure(messages: Sequence[Message], problems: list, end_tools: tuple) -> None:
    first_assistant = next((i for i, m in enumerate(messages) if m.role == "assistant"), None)
    if first_assistant is None:
        problems.append(("messages", "no assistant message (nothing to train on)"))
    prefix_end = len(messages) if first_assistant is None else first_assistant
    if not any(m.role == "user" for m in messages[:prefix_end]):
        problems.append(("messages", "no user message before the first assistant message "
                                     "(the prefix is the system messages and the task)"))
    seen_call_ids: dict[str, int] = {}
    open_calls: dict[str, tuple[int, int]] = {}   # call id -> (message index, call index)
    ended_at: int | None = None
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if m.role != "tool" and open_calls:
            for cid, (mi, ci) in open_calls.items():
                problems.append((f"messages[{mi}].tool_calls[{ci}]",
                                 f"tool call {cid!r} has no result before {name} ({m.role})"))
            open_calls.clear()
        if m.role == "assistant":
            if ended_at is not None:
                problems.append((name, f"assistant turn after the end (the episode ended with "
                                       f"the end-tool call in messages[{ended_at}])"))
            for k, call in enumerate(m.tool_calls):
                if call.id in seen_call_ids:
                    problems.append((f"{name}.tool_calls[{k}].id", f"duplicate tool call id "
                                     f"{call.id!r} (first in messages[{seen_call_ids[call.id]}])"))
                seen_call_ids[call.id] = i
                open_calls[call.id] = (i, k)
                if call.name in end_tools and ended_at is None:
                    ended_at = i
        elif m.role == "tool":
            if m.tool_call_id in open_calls:
                del open_calls[m.tool_call_id]
            elif m.tool_call_id in seen_call_ids:
                problems.append((f"{name}.tool_call_id", f"tool result for call {m.tool_call_id!r} "
                                 "is a duplicate or does not directly follow the assistant message "
                                 "that made the call"))
            else:
                problems.append((f"{name}.tool_call_id", f"tool result without its call: no "
                                 f"assistant message called {m.tool_call_id!r}"))
    # Calls left open by the final assistant message are allowed: the episode stopped there.


# ----------------------------------------------------------------------------------------------
# Turns


@dataclass(frozen=True)
class Turn:
    """One assistant message and the messages that answer it (tool results, nudges) before the next."""
    assistant: Message
    observations: tuple[Message, ...]
    first_message: int   # index of the assistant message in the trajectory


def split_turns(messages: Sequence[Message]) -> tuple[tuple[Message, ...], tuple[Turn, ...]]:
    """(prefix, turns): the prefix is every message before the first assistant message."""
    starts = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not starts:
        return tuple(messages), ()
    prefix = tuple(messages[:starts[0]])
    bounds = starts + [len(messages)]
    turns = tuple(Turn(messages[a], tuple(messages[a + 1:b]), a) for a, b in zip(bounds, bounds[1:]))
    return prefix, turns


# ----------------------------------------------------------------------------------------------
# Files


def iter_jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line; blank lines are not records."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def read_jsonl(path: str, *, on_error: str = "raise", stats: SkipStats | None = None,
               end_tools: Sequence[str] = END_TOOLS) -> Iterator[Trajectory]:
    """Trajectories of one JSONL file. on_error='skip' counts (in `stats`) and logs bad lines."""
    check_on_error(on_error)
    for number, raw in iter_jsonl_lines(path):
        try:
            yield parse_line(raw, source=path, line=number, end_tools=end_tools)
        except TrajectoryError as e:
            if on_error == "raise":
                raise
            if stats is not None:
                stats.record(e, f"{path}:{number}")
            else:
                logging.warning("skipping %s:%d: %s", path, number, e)


def validate_file(path: str, *, end_tools: Sequence[str] = END_TOOLS) -> list[Issue]:
    """Every problem in a JSONL file, in line order."""
    issues: list[Issue] = []
    for number, raw in iter_jsonl_lines(path):
        try:
            parse_line(raw, source=path, line=number, end_tools=end_tools)
        except TrajectoryError as e:
            issues.extend(e.issues)
    return issues


def write_jsonl(path: str, trajectories: Sequence[Trajectory]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in trajectories:
            f.write(t.to_json() + "\n")


def main(argv: Sequence[str]) -> int:
    """`python -m klong_jax.data.validate FILE...`: prints every problem; exit 1 if any."""
    if len(argv) < 2:
        print("usage: python -m klong_jax.data.validate FILE.jsonl [FILE.jsonl ...]")
        return 2
    n_issues = 0
    for path in argv[1:]:
        for issue in validate_file(path):
            print(issue)
            n_issues += 1
    print(f"{n_issues} problem(s) in {len(argv) - 1} file(s)")
    return 1 if n_issues else 0

