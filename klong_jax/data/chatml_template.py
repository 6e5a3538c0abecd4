"""ChatML (`ChatMLTemplate`, name "chatml"): SmolLM2 / Qwen-style chat format with JSON tool calls, under
the `ChatTemplate` contract of template_base.py.

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{task}<|im_end|>
    \\n<|im_start|>assistant\\n<think>{reasoning}</think>\\n{content}
    <tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call>
    <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
    \\n<|im_start|>tool\\n{result}<|im_end|>
    \\n<|im_start|>tool\\n{result 2}<|im_end|>
    \\n<|im_start|>assistant\\n...

(lines broken at the `\\n` that starts each message; `\\n` is a newline, the text between is literal).

Attribution. The newline after `<|im_end|>` and the next `<|im_start|>` belong to the NEXT message: every
message but the first opens with `\\n<|im_start|>{role}\\n`. So an assistant message is

    \\n<|im_start|>assistant\\n      generation prompt: role assistant, not trainable (given)
    {body}<|im_end|>                 generated: role assistant, trainable; `<|im_end|>` is the stop token

and nothing of it follows `<|im_end|>`: the sampler's output up to its stop token is exactly the generated
part, a window of the splitter ends at its last `<|im_end|>`, and a tool result after it starts with its own
`\\n<|im_start|>tool\\n` (role tool, not trainable). The concatenation is the model's own ChatML, token for
token: `render(messages)` + `generation_prompt_ids` equals Hugging Face's `apply_chat_template(...,
add_generation_prompt=True)`; `conversation_ids(messages)` (render + the closing "\\n") equals it without.

Body of an assistant message: its blocks joined by "\\n": `<think>{reasoning}</think>` when the reasoning is
non-empty, `{content}` when non-empty, then one `<tool_call>{json}</tool_call>` per call, where json is
`{"name": NAME, "arguments": {...}}` (json.dumps, non-ASCII kept; a tag spelled inside a JSON string is
written with `\\u003c` for its `<`, so arguments can hold any text). The tags are plain text unless the
tokenizer has them as special tokens (then their ids are used); SmolLM2 has no such tokens, so parsing works
on the decoded text. Parse (never raises; problems go to `errors`): a `<think>` block only at the start of
the body (after optional whitespace) is the reasoning, and one "\\n" after `</think>` is the separator; the
content is the text before the first `<tool_call>` (one "\\n" before the call is the separator); each call
must be a JSON object with a non-empty string "name" and an object "arguments" (a missing "arguments" is {});
a malformed call (bad JSON, no name, arguments not an object, a missing `</tool_call>`) is reported and not
run; text after a call is reported and dropped. Round trips are exact unless the content itself contains
`<tool_call>`, the reasoning contains `</think>`, or (without reasoning) the content starts with `<think>`:
with plain-text tags those spellings are the format's own.

Token runs. A system/user/tool message encodes `{role}\\n{content}` as one text run, exactly as a tokenizer
over the whole ChatML string does (special tokens split text into independent runs). An assistant message
encodes `assistant\\n` and its body as separate runs, because the model generates the body after the fixed
generation prompt; the ids differ from tokenizing `assistant\\n{content}` in one piece only when the content
starts with two or more whitespace characters (byte-level BPE then joins the prompt's newline with them).

Default system message: when the first message is not a system message, `render` opens with the model's
default system message (role "format", message index -1), as SmolLM2's template does. It is read from the
tokenizer's `chat_template` (GGUF `tokenizer.chat_template`) by `default_system_message`, or given to the
constructor; None: no default.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from klong_jax.data.template_base import (ArgTypes, CallId, ChatTemplate, ParsedAssistant, _Special,
                                          default_call_id)
from klong_jax.data.tokenizer import Tokenizer
from klong_jax.data.trajectory import Message, ToolCall

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TAGS = (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL)
CHATML_TOKENS = (IM_START, IM_END)          # what a tokenizer must have as special tokens
FORMAT_HINT = ('A tool call is one JSON object inside <tool_call></tool_call>, its arguments an object, e.g. '
               '<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}</tool_call>')
_DERIVE = object()   # default_system: read it from the tokenizer's chat_template


# ----------------------------------------------------------------------------------------------
# The default system message of a ChatML Jinja template

_JINJA_BLOCK = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_STRING_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.S)
_SYSTEM_BLOCK = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def default_system_message(chat_template: str | None, *, source: str = "chat_template") -> str | None:
    """The system message a ChatML Jinja template writes itself when the conversation has none: the text
    of a complete `<|im_start|>system\\n...<|im_end|>` spelled out in one string literal of a `{{ }}` /
    `{% %}` block (Jinja escapes such as \\n decoded) or in the template's raw text. SmolLM2's template:
    `{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n' }}` inside
    `{% if loop.first and messages[0]['role'] != 'system' %}`. None when there is none (a template that
    only writes `'<|im_start|>' + message['role']`); a ValueError naming `source` when two differ."""
    if not chat_template:
        return None
    texts: list[str] = []
    pos = 0
    for block in _JINJA_BLOCK.finditer(chat_template):
        texts.append(chat_template[pos:block.start()])      # raw text is output as written
        for lit in _STRING_LITERAL.finditer(block.group()):
            raw = lit.group(1) if lit.group(1) is not None else lit.group(2)
            texts.append(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), raw))
        pos = block.end()
    texts.append(chat_template[pos:])
    found = sorted({m.group(1) for t in texts for m in _SYSTEM_BLOCK.finditer(t)})
    if len(found) > 1:
        raise ValueError(f"{source}: the chat template spells out {len(found)} different default system "
                         f"messages {[f[:40] for f in found]}; pass default_system= to ChatMLTemplate")
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------


class ChatMLTemplate(ChatTemplate):
    """ChatML with `<think>` reasoning and JSON `<tool_call>`s (layout and attribution: module docstring).

    tokenizer: must have `<|im_start|>` and `<|im_end|>` as special tokens; `<|endoftext|>` is a second
    stop token when it has it. default_system: the system message inserted when a conversation has none;
    by default read from `tokenizer.chat_template` (None when the tokenizer carries no template)."""
    name = "chatml"
    call_end_text = END_TOOL_CALL
    format_hint = FORMAT_HINT

    def __init__(self, tokenizer: Tokenizer, *, default_system: str | None = _DERIVE):  # type: ignore[assignment]
        self.tokenizer = tokenizer
        self.ids = tokenizer.special_ids(CHATML_TOKENS)
        eot = tokenizer.special_id(ENDOFTEXT)
        if eot is not None:
            self.ids[ENDOFTEXT] = eot
        # Tags the tokenizer has as special tokens are written as their ids (then text can never forge them).
        self.tag_ids = {t: i for t in TAGS if (i := tokenizer.special_id(t)) is not None}
        self._special_by_id = {i: t for t, i in {**self.ids, **self.tag_ids}.items()}
        self.stop_ids = (self.ids[IM_END],) + ((eot,) if eot is not None else ())
        self.format_prefix_ids: list[int] = []
        self._newline = tokenizer.encode("\n")
        self._assistant_header = [self.ids[IM_START]] + tokenizer.encode("assistant\n")
        self.generation_prompt_ids = self._newline + self._assistant_header
        split = sorted(set(self.ids) | set(self.tag_ids), key=len, reverse=True)
        self._text_split_re = re.compile("|".join(re.escape(t) for t in split))
        if default_system is _DERIVE:
            default_system = default_system_message(tokenizer.chat_template, source=f"{tokenizer!r}.chat_template")
        self.default_system = default_system

    # ------------------------------------------------------------------------------------------
    # Rendering

    def _opening(self, messages: Sequence[Message]) -> tuple[list[int], Message | None]:
        if self.default_system is None or not messages or messages[0].role == "system":
            return [], None
        system = Message("system", self.default_system)
        return self.render_message(system, None)[0], system

    @staticmethod
    def call_json(call: ToolCall) -> str:
        """The JSON object of one call, tags inside strings written with \\u003c (still the same JSON)."""
        text = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        for tag in TAGS:
            text = text.replace(tag, "\\u003c" + tag[1:])
        return text

    def body_pieces(self, message: Message) -> list[str]:
        """Text and tags (_Special) of an assistant message's body (between the prompt and `<|im_end|>`)."""
        blocks: list[list[str]] = []
        if message.reasoning:
            blocks.append([_Special(THINK), message.reasoning, _Special(END_THINK)])
        if message.content:
            blocks.append([message.content])
        for call in message.tool_calls:
            blocks.append([_Special(TOOL_CALL), self.call_json(call), _Special(END_TOOL_CALL)])
        pieces: list[str] = []
        for k, block in enumerate(blocks):
            pieces += (["\n"] if k else []) + block
        return pieces

    def end_of_turn_id(self, message: Message) -> int:
        return self.ids[IM_END]

    def encode_pieces(self, pieces: Sequence[str]) -> list[int]:
        """Text and plain-text tags join into one run; template tokens and special-token tags are ids."""
        ids: list[int] = []
        text = ""
        for p in pieces:
            tid = None
            if isinstance(p, _Special):
                tid = self.ids.get(p, self.tag_ids.get(p))
            if tid is None:
                text += p
                continue
            if text:
                ids += self.tokenizer.encode(text)
                text = ""
            ids.append(tid)
        if text:
            ids += self.tokenizer.encode(text)
        return ids

    def render_message(self, message: Message, prev: Message | None = None
                       ) -> tuple[list[int], list[bool]]:
        """(ids, trainable) of one message: `\\n` (unless it is the first, prev None) + `<|im_start|>`
        + `{role}\\n{content}` + `<|im_end|>`; an assistant message is the generation prompt (always with
        its `\\n`) + body + `<|im_end|>`, trainable from the body on."""
        if message.role == "assistant":
            body = self.encode_pieces(self.body_pieces(message)) + [self.ids[IM_END]]
            prompt = self.generation_prompt_ids
            return prompt + body, [False] * len(prompt) + [True] * len(body)
        lead = self._newline if prev is not None else []
        message = self.fill_slots(message)
        ids = lead + [self.ids[IM_START]] + self.tokenizer.encode(f"{message.role}\n{message.content}") + \
            [self.ids[IM_END]]
        return ids, [False] * len(ids)

    def conversation_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = False
                         ) -> list[int]:
        """ChatML closes every message with "\\n": render + "\\n", or render + the generation prompt
        (without its "\\n" when there is no message before it)."""
        ids = self.render(messages).input_ids.tolist()
        if add_generation_prompt:
            return ids + (self.generation_prompt_ids if ids else self._assistant_header)
        return ids + (self._newline if ids else [])

    # ------------------------------------------------------------------------------------------
    # Parsing (pieces_from_ids / pieces_from_text: the base class, over _special_by_id / _text_split_re)

    def parse_pieces(self, pieces: Sequence[str], *, arg_types: ArgTypes | None = None,
                     call_id: CallId = default_call_id) -> ParsedAssistant:
        """Parses the pieces of a generated assistant message (a leading generation prompt,
        `\\n<|im_start|>assistant\\n`, is skipped). Never raises."""
        errors: list[str] = []
        pieces = list(pieces)
        pos = 0
        # A leading generation prompt: optional whitespace, <|im_start|>, "assistant\n".
        lead = 1 if pieces and not isinstance(pieces[0], _Special) and not pieces[0].strip() else 0
        if (len(pieces) > lead and pieces[lead] == IM_START and isinstance(pieces[lead], _Special)
                and len(pieces) > lead + 1 and not isinstance(pieces[lead + 1], _Special)
                and pieces[lead + 1].startswith("assistant\n")):
            pieces[lead + 1] = pieces[lead + 1][len("assistant\n"):]
            pos = lead + 1
        body = ""
        while pos < len(pieces) and (not isinstance(pieces[pos], _Special) or pieces[pos] in TAGS):
            body += str(pieces[pos])
            pos += 1
        end_token = None
        if pos < len(pieces):
            tag = str(pieces[pos])
            if pieces[pos] in (IM_END, ENDOFTEXT):
                end_token = tag
                if pos + 1 < len(pieces):
                    errors.append(f"{len(pieces) - pos - 1} piece(s) after the end-of-turn token {tag}")
            else:
                errors.append(f"unexpected token {tag!r} at piece {pos}")
        reasoning, content, calls = parse_body(body, errors, arg_types=arg_types, call_id=call_id)
        message = Message("assistant", content, reasoning, tuple(calls))
        return ParsedAssistant(message, tuple(errors), end_token is not None, end_token)

    def tools_system_text(self, tools: Sequence[dict]) -> str:
        """The tool schemas and the JSON call format, as a system message (Qwen/Hermes layout)."""
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{schemas}\n</tools>\n\n"
                "For each function call, return a JSON object with the function name and arguments within "
                "<tool_call></tool_call> XML tags:\n"
                '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>')


# ----------------------------------------------------------------------------------------------
# The body of an assistant message


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _coerce(value, declared: str | None, where: str, errors: list[str]):
    """A JSON argument value under its declared type: a string where a non-string is declared is read as
    JSON (a model that quoted a number); a non-string where a string is declared becomes its JSON text."""
    if declared is None:
        return value
    if declared == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            decoded = value
        if isinstance(decoded, str):
            errors.append(f"{where}: expected a JSON {declared}, got {value[:80]!r}")
        return decoded
    return value


def _parse_call(inner: str, where: str, errors: list[str], arg_types: ArgTypes | None):
    """(name, arguments) of one `<tool_call>` block's text, or None (reported) when malformed."""
    raw = inner.strip()
    try:
        obj = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        errors.append(f"{where}: key {e.args[0]!r} given twice")
        return None
    except json.JSONDecodeError as e:
        errors.append(f"{where}: not valid JSON ({e.msg} at character {e.pos}): {raw[:80]!r}")
        return None
    except (ValueError, RecursionError) as e:
        errors.append(f"{where}: not valid JSON ({type(e).__name__}): {raw[:80]!r}")
        return None
    if not isinstance(obj, dict):
        errors.append(f'{where}: expected a JSON object {{"name": ..., "arguments": {{...}}}}, got '
                      f"{type(obj).__name__} {raw[:80]!r}")
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: tool call without a name (a non-empty string \"name\"): {raw[:80]!r}")
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        errors.append(f'{where}: "arguments" must be a JSON object, got {type(arguments).__name__} '
                      f"{json.dumps(arguments, ensure_ascii=False)[:80]}")
        return None
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        errors.append(f"{where}: unexpected key(s) {extra} (a call has only \"name\" and \"arguments\")")
    name = name.strip()
    types = (arg_types or {}).get(name, {})
    return name, {k: _coerce(v, types.get(k), f"{where}.{k}", errors) for k, v in arguments.items()}


def parse_body(body: str, errors: list[str], *, arg_types: ArgTypes | None = None,
               call_id: CallId = default_call_id) -> tuple[str | None, str, list[ToolCall]]:
    """(reasoning, content, calls) of an assistant body's text; problems appended to `errors`."""
    reasoning = None
    rest = body
    stripped = rest.lstrip()
    if stripped.startswith(THINK):
        start = len(rest) - len(stripped) + len(THINK)
        end = rest.find(END_THINK, start)
        if end < 0:
            errors.append(f"reasoning: {THINK} without {END_THINK}")
            return rest[start:] or None, "", []
        reasoning = rest[start:end] or None
        rest = rest[end + len(END_THINK):]
        if rest.startswith("\n"):
            rest = rest[1:]
    calls: list[ToolCall] = []
    at = rest.find(TOOL_CALL)
    if at < 0:
        return reasoning, rest, calls
    content = rest[:at]
    if content.endswith("\n"):
        content = content[:-1]
    k = 0
    while at >= 0:
        where = f"tool_calls[{k}]"
        start = at + len(TOOL_CALL)
        end = rest.find(END_TOOL_CALL, start)
        reopened = rest.find(TOOL_CALL, start)
        if end < 0 or 0 <= reopened < end:
            stop = reopened if reopened >= 0 else len(rest)
            errors.append(f"{where}: unclosed tool call (no {END_TOOL_CALL}): {rest[start:stop][:80]!r}")
            at, k = reopened, k + 1
            continue
        parsed = _parse_call(rest[start:end], where, errors, arg_types)
        if parsed is not None:
            calls.append(ToolCall(call_id(len(calls)), *parsed))
        after = end + len(END_TOOL_CALL)
        at = rest.find(TOOL_CALL, after)
        between = rest[after:at if at >= 0 else len(rest)]
        if between.strip():
            errors.append(f"text after tool call {k}: {between.strip()[:80]!r}")
        k += 1
    return reasoning, content, calls
