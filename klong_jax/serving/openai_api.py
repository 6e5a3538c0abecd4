"""OpenAI chat-completions requests <-> the project's chat format (the configured chat template: GLM-4.5 or
ChatML) and sampler.

Requests: `messages` (system/developer, user, assistant with optional `tool_calls` and the non-standard
`reasoning_content`, tool with `tool_call_id`), `tools` (function schemas, rendered into a system
message before the conversation by the template's `tools_system_text`, as GLM-4.5's and Qwen's
templates do), `tool_choice` ("none" hides the tools; anything else leaves the choice to the model:
decoding is not constrained), `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `top_k` (extension), `n`, `stop`, `seed`, `logprobs`,
`response_format` (`{"type": "json_schema", "json_schema": {"name", "schema"}}` or `{"type": "json_object"}`:
the whole answer is decoded under the schema's grammar, klong_jax.sampling.json_schema; an unsupported schema is
a 400 naming the keyword).
Responses carry `content`, `reasoning_content` and `tool_calls` parsed from the generated ids by the
chat template's parser.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax.data.template_base import ChatTemplate
from klong_jax.data.trajectory import Message, ToolCall
from klong_jax.sampling.types import Completion, SamplingParams


class RequestError(ValueError):
    """A malformed request; `param` names the offending field (OpenAI error format)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{i}]: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of text parts", where)


def _tool_call(call: Any, where: str) -> ToolCall:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise RequestError(f"{where}: expected {{'id', 'type': 'function', 'function': {{...}}}}", where)
    fn = call["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.function.name: a non-empty string is required", f"{where}.function.name")
    raw = fn.get("arguments", "{}")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise RequestError(f"{where}.function.arguments: not JSON ({e})", f"{where}.function.arguments") from None
    if not isinstance(args, Mapping):
        raise RequestError(f"{where}.function.arguments: must encode a JSON object", f"{where}.function.arguments")
    return ToolCall(str(call.get("id") or ""), name, dict(args))


def parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages: a non-empty list is required", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise RequestError(f"{where}: must be an object", where)
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"{where}.role: {role!r} is not system, developer, user, assistant or tool",
                               f"{where}.role")
        content = _text(m.get("content"), f"{where}.content")
        if role == "assistant":
            calls = tuple(_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(m.get("tool_calls") or ()))
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            out.append(Message("assistant", content, reasoning if isinstance(reasoning, str) else None, calls))
        elif role == "tool":
            out.append(Message("tool", content, tool_call_id=m.get("tool_call_id")))
        else:
            out.append(Message(role, content))
    if out[0].role == "assistant":
        raise RequestError("messages[0]: a conversation starts with a system or user message", "messages")
    return out


def parse_tools(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError("tools: must be a list", "tools")
    tools = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping) \
                or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name', ...}}}}",
                               f"tools[{i}]")
        tools.append({"type": "function", "function": dict(fn)})
    return tools


def tools_system_text(template: ChatTemplate, tools: Sequence[dict]) -> str:
    """The tool schemas and the template's call format, as a system message."""
    return template.tools_system_text(tools)


def argument_types(tools: Sequence[dict]) -> dict[str, dict[str, str]]:
    """tool -> argument -> declared JSON type (for decoding generated argument values)."""
    out = {}
    for t in tools:
        props = (t["function"].get("parameters") or {}).get("properties") or {}
        out[t["function"]["name"]] = {k: v["type"] for k, v in props.items()
                                      if isinstance(v, Mapping) and isinstance(v.get("type"), str)}
    return out


def prompt_ids(template: ChatTemplate, messages: Sequence[Message], tools: Sequence[dict]) -> list[int]:
    """The rendered conversation followed by the template's generation prompt."""
    if tools:
        messages = [Message("system", tools_system_text(template, tools))] + list(messages)
    return template.conversation_ids(messages, add_generation_prompt=True)


def response_format(body: Mapping) -> dict | None:
    """The JSON schema a request's `response_format` asks for (json_object: any object), or None for text."""
    raw = body.get("response_format")
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise RequestError('response_format: expected {"type": "text" | "json_object" | "json_schema", ...}, got '
                           f"{raw!r}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = raw.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise RequestError('response_format.json_schema.schema: a JSON schema object is required ({"type": '
                           '"json_schema", "json_schema": {"name": "...", "schema": {...}}})',
                           "response_format.json_schema.schema")
    return dict(schema)


def _number(body: Mapping, key: str, default, kind, low=None, high=None):
    value = body.get(key)
    if value is None:
        return default
    not_number = isinstance(value, bool) or not isinstance(value, (int, float))
    if not_number or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{key}={value} is outside [{low}, {high}]", key)
    return value


def sampling_params(body: Mapping, stop_token_ids: Sequence[int],
                    default_max_tokens: int) -> tuple[SamplingParams, int]:
    """(SamplingParams, n) from a request body."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop: a non-empty string or a list of them", "stop")
    n = _number(body, "n", 1, int, 1, 16)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed: expected an integer, got {seed!r}", "seed")
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0), top_k=_number(body, "top_k", 0, int, 0),
        stop_token_ids=tuple(stop_token_ids), stop_strings=tuple(stops),
        seed=None if seed is None else int(seed) % (2**31 - 1)), n


def choice(template: ChatTemplate, index: int, completion: Completion, tools: Sequence[dict],
           *, logprobs: bool = False) -> dict:
    """One OpenAI choice: the generated ids parsed into content, reasoning_content and tool_calls."""
    types = argument_types(tools)
    if isinstance(completion.stop, str):          # a stop string cut the ids mid-token: parse the text
        parsed = template.parse_assistant_text(completion.text or "", arg_types=types,
                                               call_id=lambda k: f"call_{index}_{k}")
    else:
        parsed = template.parse_assistant(completion.tokens, arg_types=types,
                                          call_id=lambda k: f"call_{index}_{k}")
    msg = parsed.message
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
             for c in msg.tool_calls]
    message: dict[str, Any] = {"role": "assistant", "content": msg.content if msg.content or not calls else None}
    if msg.reasoning is not None:
        message["reasoning_content"] = msg.reasoning
    if calls:
        message["tool_calls"] = calls
    finish = "length" if completion.finish_reason == "length" else "tool_calls" if calls else "stop"
    out: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
    if logprobs:
        tok = template.tokenizer
        out["logprobs"] = {"content": [
            {"token": tok.decode([t]), "logprob": float(lp), "bytes": list(tok.decode([t]).encode()),
             "top_logprobs": []} for t, lp in zip(completion.tokens, completion.logprobs)]}
    return out
