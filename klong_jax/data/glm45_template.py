"""The GLM-4.5 chat format (`Glm45Template`, name "glm45"), rendered to token ids with a role, message
and turn index per token (the `ChatTemplate` contract of template_base.py).

    [gMASK]<sop><|system|>\\n{system}<|user|>\\n{task}
    <|assistant|>\\n<think>{reasoning}</think>\\n{content}
    \\n<tool_call>{name}\\n<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n</tool_call><|observation|>
    \\n<tool_response>\\n{result}\\n</tool_response>\\n<tool_response>\\n{result 2}\\n</tool_response>
    <|assistant|>...

End of turn: GLM-4.5 stops generating at the role token of what comes next, so an assistant message
ends with `<|observation|>` when it calls tools and `<|user|>` otherwise. That token is generated (and
trained) as part of the assistant turn; the message after it does not repeat it. This reproduces GLM's
own template token for token for the usual conversation shapes. Deviations from GLM's template, on
purpose: reasoning is kept in every assistant turn (GLM drops it before the last user message; an
agent's context keeps it, and a window must be one causal sequence), and content is not stripped, so
rendering then parsing gives back the same message. Non-string argument values are JSON-encoded.

Every tag is a special token (a single id); text between tags is encoded run by run, so a message
renders the same wherever it stands and token counts add up exactly.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from klong_jax.data.template_base import (ROLE_CODES, ArgTypes, CallId, ChatTemplate,  # noqa: F401
                                          ParsedAssistant, Rendered, _Special, default_call_id)
from klong_jax.data.tokenizer import Tokenizer
from klong_jax.data.trajectory import Message, ToolCall

GMASK, SOP, ENDOFTEXT = "[gMASK]", "<sop>", "<|endoftext|>"
SYSTEM, USER, ASSISTANT, OBSERVATION = "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"

TEMPLATE_TOKENS = (ENDOFTEXT, GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, THINK, END_THINK,
                   TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE, ARG_KEY, END_ARG_KEY,
                   ARG_VALUE, END_ARG_VALUE)
# GLM-4.5's own special tokens that the template does not use but a tokenizer should reserve.
GLM45_SPECIAL_TOKENS = TEMPLATE_TOKENS + ("[MASK]", "[sMASK]", "<eop>")

_ROLE_TOKEN = {"system": SYSTEM, "user": USER, "tool": OBSERVATION, "assistant": ASSISTANT}
STOP_TOKENS = (OBSERVATION, USER, ENDOFTEXT)   # what ends a generated assistant turn


def end_of_turn_token(message: Message) -> str:
    return OBSERVATION if message.tool_calls else USER


FORMAT_HINT = ("A tool call is written <tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE"
               "</arg_value>\\n</tool_call>, one <arg_key>/<arg_value> pair per argument.")


def encode_argument(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class Glm45Template(ChatTemplate):
    """Renders and parses the GLM-4.5 chat format with one tokenizer (every tag a special token)."""
    name = "glm45"
    format_hint = FORMAT_HINT

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids = tokenizer.special_ids(TEMPLATE_TOKENS)
        self._special_by_id = {i: t for t, i in self.ids.items()}
        self.stop_ids = tuple(self.ids[t] for t in STOP_TOKENS)
        self.format_prefix_ids = [self.ids[GMASK], self.ids[SOP]]
        self.generation_prompt_ids = [self.ids[ASSISTANT]]
        self._text_split_re = re.compile("|".join(re.escape(t) for t in sorted(
            TEMPLATE_TOKENS, key=len, reverse=True)))

    # ------------------------------------------------------------------------------------------
    # Rendering

    def _segments(self, message: Message, prev: Message | None) -> list[str]:
        """Tags (_Special) and text of one message; the first tag is its role token unless the
        previous message already emitted it (end of an assistant turn, or a run of tool results)."""
        role_token = _ROLE_TOKEN[message.role]
        repeated = prev is not None and (
            (prev.role == "assistant" and end_of_turn_token(prev) == role_token)
            or (prev.role == "tool" and message.role == "tool"))
        segs: list[str] = [] if repeated else [_Special(role_token)]
        if message.role in ("system", "user"):
            segs.append("\n" + message.content)
        elif message.role == "tool":
            segs += ["\n", _Special(TOOL_RESPONSE), "\n" + message.content + "\n",
                     _Special(END_TOOL_RESPONSE)]
        else:
            segs += ["\n", _Special(THINK), message.reasoning or "", _Special(END_THINK)]
            if message.content:
                segs.append("\n" + message.content)
            for call in message.tool_calls:
                segs += ["\n", _Special(TOOL_CALL), call.name + "\n"]
                for key, value in call.arguments.items():
                    segs += [_Special(ARG_KEY), key, _Special(END_ARG_KEY), "\n", _Special(ARG_VALUE),
                             encode_argument(value), _Special(END_ARG_VALUE), "\n"]
                segs.append(_Special(END_TOOL_CALL))
            segs.append(_Special(end_of_turn_token(message)))
        return segs

    def end_of_turn_id(self, message: Message) -> int:
        return self.ids[end_of_turn_token(message)]

    def encode_pieces(self, segs: Sequence[str]) -> list[int]:
        ids: list[int] = []
        text = ""
        for s in segs:
            if isinstance(s, _Special):
                if text:
                    ids += self.tokenizer.encode(text)
                    text = ""
                ids.append(self.ids[s])
            else:
                text += s
        if text:
            ids += self.tokenizer.encode(text)
        return ids

    def render_message(self, message: Message, prev: Message | None = None
                       ) -> tuple[list[int], list[bool]]:
        """(ids, trainable) of one message; `prev` is the message before it (None at the start)."""
        ids = self.encode_pieces(self._segments(self.fill_slots(message), prev))
        if message.role != "assistant":
            return ids, [False] * len(ids)
        # The role token is the generation prompt (given, not generated); the rest is generated.
        return ids, [False] + [True] * (len(ids) - 1)

    # ------------------------------------------------------------------------------------------
    # Parsing generated output

    def parse_pieces(self, pieces: Sequence[str], *, arg_types: ArgTypes | None = None,
                     call_id: CallId = default_call_id) -> ParsedAssistant:
        """Parses pieces after the `<|assistant|>` prompt (a leading one is skipped). Never raises."""
        return parse_pieces(pieces, arg_types=arg_types, call_id=call_id)

    def tools_system_text(self, tools: Sequence[dict]) -> str:
        """The tool schemas and the call format, as a system message (GLM-4.5's layout)."""
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{schemas}\n</tools>\n\n"
                "For each function call, output the function name and arguments within the following XML "
                "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
                "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
                "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")


def _decode_argument(raw: str, declared: str | None, where: str, errors: list[str]):
    if declared == "string":
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):   # not JSON (or nested past the parser's depth)
        if declared is not None:
            errors.append(f"{where}: expected a JSON {declared}, got {raw[:80]!r}")
        return raw
    # Without a declared type, a value that reads as a JSON string stays the raw text.
    return raw if declared is None and isinstance(value, str) else value


def parse_pieces(pieces: Sequence[str], *, arg_types: ArgTypes | None = None,
                 call_id: CallId = default_call_id) -> ParsedAssistant:
    errors: list[str] = []
    pos = 0

    def peek():
        return pieces[pos] if pos < len(pieces) else None

    def at(tag: str) -> bool:
        # Text that spells a tag (a quoted "<tool_call>") is text, not the tag: compare types too.
        return pos < len(pieces) and isinstance(pieces[pos], _Special) and pieces[pos] == tag

    def take_text() -> str:
        nonlocal pos
        if pos < len(pieces) and not isinstance(pieces[pos], _Special):
            pos += 1
            return pieces[pos - 1]
        return ""

    def expect(tag: str, where: str) -> bool:
        nonlocal pos
        if at(tag):
            pos += 1
            return True
        errors.append(f"{where}: expected {tag}, got {peek()!r}" if peek() is not None
                      else f"{where}: expected {tag}, output ended")
        return False

    if at(ASSISTANT):
        pos += 1
    reasoning = None
    head = take_text()
    if at(THINK):
        if head.strip():
            errors.append(f"text before {THINK}: {head[:80]!r}")
        pos += 1
        reasoning = take_text() or None
        expect(END_THINK, "reasoning")
        body = take_text()
    else:
        body = head
    calls: list[ToolCall] = []
    while at(TOOL_CALL):
        pos += 1
        k = len(calls)
        where = f"tool_calls[{k}]"
        name = take_text().strip()
        if not name:
            errors.append(f"{where}: tool call without a name")
        args: dict = {}
        types = (arg_types or {}).get(name, {})
        closed = False
        while pos < len(pieces):
            if at(END_TOOL_CALL):
                pos += 1
                closed = True
                break
            if not at(ARG_KEY):
                if isinstance(peek(), _Special):
                    errors.append(f"{where}: unexpected {str(peek())} inside the tool call")
                    break
                stray = take_text()
                if stray.strip():
                    errors.append(f"{where}: text outside <arg_key>/<arg_value>: {stray[:80]!r}")
                continue
            pos += 1
            key = take_text().strip()
            if not expect(END_ARG_KEY, f"{where}.{key or '?'}"):
                break
            if take_text().strip():
                errors.append(f"{where}.{key}: text between </arg_key> and <arg_value>")
            if not expect(ARG_VALUE, f"{where}.{key}"):
                break
            raw = take_text()
            if not expect(END_ARG_VALUE, f"{where}.{key}"):
                break
            if not key:
                errors.append(f"{where}: argument with an empty name")
            elif key in args:
                errors.append(f"{where}: argument {key!r} given twice")
            else:
                args[key] = _decode_argument(raw, types.get(key), f"{where}.{key}", errors)
        if not closed:
            errors.append(f"{where}: unclosed tool call (no {END_TOOL_CALL})")
            break
        calls.append(ToolCall(call_id(k), name, args))
        between = take_text()
        if between.strip():
            errors.append(f"text after tool call {k}: {between[:80]!r}")
    end_token = None
    tag = peek()
    if any(at(t) for t in STOP_TOKENS):
        end_token = str(tag)
        pos += 1
    elif tag is not None:
        errors.append(f"unexpected {'token ' + repr(str(tag)) if isinstance(tag, _Special) else 'text'}"
                      f" at piece {pos}")
    if pos < len(pieces) and end_token is not None:
        errors.append(f"{len(pieces) - pos} piece(s) after the end-of-turn token {end_token}")
    # Content: the renderer writes "\n" + content after </think>, and "\n" before each tool call.
    if calls and body.endswith("\n"):
        body = body[:-1]
    content = body[1:] if body.startswith("\n") else body
    message = Message("assistant", content, reasoning, tuple(calls))
    return ParsedAssistant(message, tuple(errors), end_token is not None, end_token)
