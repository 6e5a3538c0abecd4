"""ChatEndpoint: a client of any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI, our own
launch/serve.py), for the Research-Factory's drafting and teacher models.

    endpoint = ChatEndpoint("http://127.0.0.1:8000/v1", "teacher-model", timeout_s=300, max_attempts=4)
    reply = endpoint.chat(messages, tools=schemas, max_tokens=2048, validate=check)   # ChatReply
    reply.content, reply.reasoning, reply.tool_calls (ReplyToolCall: id, name, arguments), reply.usage
    endpoint.stats.snapshot()   # requests, retries, failures, invalid, prompt_tokens, completion_tokens

Plain HTTP through the same POST and retry loop as the rubric's LLMJudge (`klong_jax.rubric.llm_judge`:
`post_chat_completions`, `call_with_retries`). Retried, with exponential back-off: transport errors, timeouts,
HTTP 408/409/425/429/5xx, bodies that are not a chat completion, and answers that the caller's `validate`
rejects (a function of the ChatReply that raises ValueError on garbage). Other HTTP errors (400, 401, 404)
are not retried. When no attempt succeeds `chat` raises EndpointError (the endpoint's url, every attempt's
error): a caller counts it as a failed item, never as a zero score. Tokens are counted from `usage` of every
response that carried one (rejected answers included: they were paid for). Thread-safe: one endpoint may
serve many concurrent calls.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from klong_jax.rubric.llm_judge import (MalformedResponse, RetriesExhausted, TransientError,
                                        call_with_retries, post_chat_completions)


class EndpointError(RuntimeError):
    """A chat call that failed after all its attempts. `url` is the endpoint, `errors` one message per
    attempt (the last one first in the message), `permanent` whether a non-retryable HTTP error stopped it."""

    def __init__(self, url: str, errors: Sequence[str], permanent: bool = False):
        self.url, self.errors, self.permanent = url, list(errors), permanent
        last = self.errors[-1] if self.errors else "no attempt was made"
        hint = ("a client error: check the base_url, the model name and the api key" if permanent else
                "check that the server is up and answers chat completions within timeout_s")
        super().__init__(f"chat endpoint {url} failed after {len(self.errors)} attempt(s): {last} ({hint})")


class InvalidAnswer(ValueError):
    """What a `validate` function raises for an answer it rejects (any ValueError does)."""


@dataclass(frozen=True)
class ReplyToolCall:
    id: str
    name: str
    arguments: dict[str, Any] | None    # None: `raw_arguments` is not a JSON object
    raw_arguments: str                   # as the endpoint sent it (OpenAI: a JSON string)


@dataclass(frozen=True)
class ChatReply:
    content: str                         # "" when the endpoint sent null (a reply with only tool calls)
    reasoning: str | None                # `reasoning_content` (vLLM, DeepSeek, launch/serve.py) or `reasoning`
    tool_calls: tuple[ReplyToolCall, ...]
    finish_reason: str | None
    usage: dict[str, Any]
    model: str | None
    attempts: int                        # attempts this call took (1: the first succeeded)
    errors: tuple[str, ...]              # the failed attempts' errors


@dataclass
class EndpointStats:
    """Counters over every call of one endpoint. requests: HTTP requests sent; retries: requests after a
    call's first; failures: calls that raised EndpointError; invalid: answers that did not parse as a chat
    completion or that `validate` rejected; tokens from `usage`."""
    requests: int = 0
    retries: int = 0
    calls: int = 0
    failures: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + int(value))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in ("requests", "retries", "calls", "failures", "invalid",
                                                  "prompt_tokens", "completion_tokens")}


def _usage_tokens(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_reply(data: Mapping[str, Any], url: str) -> tuple[str, str | None, tuple[ReplyToolCall, ...], str | None]:
    """(content, reasoning, tool calls, finish_reason) of the first choice of a chat-completions body;
    MalformedResponse naming the field when it is not one."""
    def bad(what: str) -> MalformedResponse:
        return MalformedResponse(f"malformed chat-completions response from {url}: {what}: "
                              f"{json.dumps(data)[:300]!r}")

    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise bad("'choices' must be a non-empty list of objects")
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        raise bad("choices[0].message must be an object")
    content = message.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad(f"choices[0].message.content must be a string or null, got {type(content).__name__}")
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise bad("choices[0].message.reasoning_content must be a string or null")
    raw_calls = message.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise bad("choices[0].message.tool_calls must be a list or null")
    calls = []
    for k, raw in enumerate(raw_calls):
        fn = raw.get("function") if isinstance(raw, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise bad(f"choices[0].message.tool_calls[{k}] needs function.name (a string)")
        raw_args = fn.get("arguments", "{}")
        if isinstance(raw_args, Mapping):   # some servers send the object itself
            arguments, raw_args = dict(raw_args), json.dumps(raw_args)
        elif isinstance(raw_args, str):
            try:
                arguments = json.loads(raw_args) if raw_args.strip() else {}
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                arguments = None
        else:
            raise bad(f"choices[0].message.tool_calls[{k}].function.arguments must be a string")
        call_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else f"call_{k}"
        calls.append(ReplyToolCall(call_id, fn["name"], arguments, raw_args))
    finish = choices[0].get("finish_reason")
    return content, reasoning, tuple(calls), finish if isinstance(finish, str) else None


class ChatEndpoint:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0, max_attempts: int = 4,
                 backoff_s: float = 2.0, max_backoff_s: float = 60.0, temperature: float | None = None,
                 max_tokens: int | None = None, extra_body: Mapping[str, Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        """base_url: up to /v1 (`{base_url}/chat/completions` is posted to). api_key: else $api_key_env
        (none: no Authorization header). timeout_s: per attempt, for connecting and for each wait on the
        socket (a non-streamed answer arrives at once, so in effect the time to the answer). temperature / max_tokens: defaults of every call (None: the
        server's). extra_body: merged into every request (e.g. {"top_p": 0.95})."""
        if max_attempts < 1:
            raise ValueError(f"ChatEndpoint max_attempts={max_attempts} must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"ChatEndpoint timeout_s={timeout_s} must be > 0")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"ChatEndpoint base_url={base_url!r} must start with http:// or https:// "
                             "(e.g. http://127.0.0.1:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.sleep = sleep
        self.stats = EndpointStats()

    def __repr__(self) -> str:
        return f"ChatEndpoint({self.url!r}, model={self.model!r})"

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: Any = None, max_tokens: int | None = None, temperature: float | None = None,
             validate: Callable[[ChatReply], None] | None = None,
             extra: Mapping[str, Any] | None = None) -> ChatReply:
        """One chat completion (the first choice), retried as the module says; EndpointError when every
        attempt failed. `messages` and `tools` are OpenAI-shaped dicts, sent as they are. `validate(reply)`
        raises ValueError for an answer to retry (its message goes to the errors)."""
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), **self.extra_body}
        if tools:
            body["tools"] = list(tools)
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        for key, value in (("max_tokens", max_tokens if max_tokens is not None else self.max_tokens),
                           ("temperature", temperature if temperature is not None else self.temperature)):
            if value is not None:
                body[key] = value
        body.update(extra or {})
        sent = [0]

        def attempt() -> ChatReply:
            self.stats.add(requests=1, retries=1 if sent[0] else 0)
            sent[0] += 1
            try:
                data = post_chat_completions(self.url, body, api_key=self.api_key, timeout_s=self.timeout_s)
                usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
                self.stats.add(prompt_tokens=_usage_tokens(usage, "prompt_tokens"),
                               completion_tokens=_usage_tokens(usage, "completion_tokens"))
                content, reasoning, calls, finish = parse_reply(data, self.url)
            except MalformedResponse:
                self.stats.add(invalid=1)
                raise
            model = data.get("model") if isinstance(data.get("model"), str) else None
            reply = ChatReply(content, reasoning, calls, finish, dict(usage), model, sent[0], ())
            if validate is not None:
                try:
                    validate(reply)
                except ValueError as e:
                    self.stats.add(invalid=1)
                    raise InvalidAnswer(f"answer from {self.url} rejected: {e}") from e
            return reply

        self.stats.add(calls=1)
        try:
            reply, errors = call_with_retries(attempt, max_attempts=self.max_attempts, backoff_s=self.backoff_s,
                                              max_backoff_s=self.max_backoff_s,
                                              retry_on=(TransientError, InvalidAnswer), sleep=self.sleep)
        except RetriesExhausted as e:
            self.stats.add(failures=1)
            raise EndpointError(self.url, e.errors, e.permanent) from e
        return ChatReply(reply.content, reply.reasoning, reply.tool_calls, reply.finish_reason, reply.usage,
                         reply.model, reply.attempts, tuple(errors))
