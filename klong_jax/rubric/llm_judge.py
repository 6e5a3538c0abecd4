"""LLMJudge: grades a leaf by asking a model behind any OpenAI-compatible chat-completions endpoint.

Plain HTTP (urllib), so any server speaking POST {base_url}/chat/completions works (vLLM, SGLang, our
own server, OpenAI). The model sees the task, the requirement with its ancestors' requirements, and a
bounded selection of the submission's files, and must end its answer with a line `VERDICT: PASS` or
`VERDICT: FAIL` (verdict_format="text"), or answer the JSON object {"explanation": ..., "verdict": "PASS" | "FAIL"}
that `VERDICT_SCHEMA` describes, sent as `response_format` so that a server with constrained decoding
(launch/serve.py, vLLM, SGLang, OpenAI) produces nothing else (verdict_format="json": for small local judges, whose
free answers ramble to max_tokens without a verdict line). Transport errors, HTTP 429/5xx, timeouts and answers
without a strict verdict are retried with exponential back-off; when every attempt fails the leaf scores 0 with
valid = False.

The HTTP call and the retry loop are shared with every other chat-completions client of the project
(`klong_jax.factory.endpoint.ChatEndpoint`): `post_chat_completions` (one POST; `TransientError` for what
is worth retrying, its subclass `MalformedResponse` for a body that is no chat completion, `PermanentError`
for what is not worth it) and `call_with_retries` (attempts with exponential
back-off; `RetriesExhausted` with every attempt's error when none succeeded).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from klong_jax.rubric.evidence import collect_files, cut_middle
from klong_jax.rubric.grading import GradingContext, LeafVerdict
from klong_jax.rubric.tree import RubricNode, ensure_keys

_ROLE = ("You grade one requirement of a research-paper reproduction. You are given the task the agent was "
         "set, the requirement (with the requirements of its parent nodes for context), and files from the "
         "agent's submission. Decide whether the submission satisfies THIS requirement, judging only from "
         "the evidence shown. ")
SYSTEM_PROMPT = _ROLE + ("Explain briefly, then end your answer with exactly one final line, either\n"
                         "VERDICT: PASS\nor\nVERDICT: FAIL")
SYSTEM_PROMPT_JSON = _ROLE + ('Answer with a JSON object only: {"explanation": "<brief reasons>", "verdict": "PASS"} '
                              'or the same with "verdict": "FAIL".')
VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["explanation", "verdict"],
                  "properties": {"explanation": {"type": "string", "maxLength": 1200},
                                 "verdict": {"enum": ["PASS", "FAIL"]}}}
VERDICT_FORMATS = ("text", "json")
_VERDICT = re.compile(r"^VERDICT: (PASS|FAIL)$")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


class TransientError(Exception):
    """A failed attempt worth retrying: transport error, timeout, HTTP 408/409/425/429/5xx, a malformed
    response body."""


class MalformedResponse(TransientError):
    """A response that is no chat completion (not JSON, or without the fields of one): retried."""


class PermanentError(Exception):
    """A failed attempt that a retry would repeat (HTTP 400, 401, 403, 404, ...): no further attempts."""


class RetriesExhausted(Exception):
    """Every attempt failed; `errors` holds one message per attempt, `permanent` says whether the last
    one stopped the retries early (a PermanentError)."""

    def __init__(self, errors: list[str], permanent: bool):
        self.errors, self.permanent = list(errors), permanent
        super().__init__(f"failed after {len(self.errors)} attempt(s): {self.errors[-1] if self.errors else '?'}")


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """Seconds to wait before attempt `attempt` (0-based): 0 for the first, then backoff_s * 2^(attempt-1),
    capped at max_backoff_s."""
    return 0.0 if attempt <= 0 else min(max_backoff_s, backoff_s * 2 ** (attempt - 1))


def call_with_retries(attempt_fn: Callable[[], _T], *, max_attempts: int, backoff_s: float,
                      max_backoff_s: float, retry_on: tuple[type[BaseException], ...] = (TransientError,),
                      sleep: Callable[[float], None] = time.sleep) -> tuple[_T, list[str]]:
    """(attempt_fn's value, the errors of the failed attempts before it). An exception in `retry_on` is
    retried after `backoff_delay`; a PermanentError ends the attempts at once; anything else propagates
    (a bug, not a bad answer). Raises RetriesExhausted when no attempt succeeded."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    errors: list[str] = []
    for attempt in range(max_attempts):
        if attempt:
            sleep(backoff_delay(attempt, backoff_s, max_backoff_s))
        try:
            return attempt_fn(), errors
        except PermanentError as e:
            errors.append(str(e))
            raise RetriesExhausted(errors, permanent=True) from e
        except retry_on as e:
            errors.append(str(e))
    raise RetriesExhausted(errors, permanent=False)


def post_chat_completions(url: str, body: dict[str, Any], *, api_key: str | None,
                          timeout_s: float) -> dict[str, Any]:
    """POSTs `body` to `url` (a `.../chat/completions` address) and returns the decoded JSON object.
    TransientError: transport failure, timeout, HTTP in RETRY_STATUS, a body that is not a JSON object;
    PermanentError: any other HTTP error status. Messages name the url and quote the server's answer."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode(errors="replace")
        error = f"HTTP {e.code} from {url}: {detail}"
        raise (TransientError if e.code in RETRY_STATUS else PermanentError)(error) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise TransientError(f"request to {url} failed: {type(e).__name__}: {e}") from e
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"the body is a JSON {type(data).__name__}, not an object")
    except (ValueError, TypeError) as e:
        raise MalformedResponse(f"malformed chat-completions response from {url} ({e}): "
                             f"{raw[:300].decode(errors='replace')!r}") from e
    return data


class VerdictFormatError(ValueError):
    pass


def parse_json_verdict(text: str, finish_reason: str | None = None) -> tuple[float, str]:
    """(score, explanation) from a JSON answer {"explanation": str, "verdict": "PASS" | "FAIL"} (VERDICT_SCHEMA);
    VerdictFormatError for anything else, and for an answer cut at max_tokens (finish_reason "length")."""
    if finish_reason == "length":
        raise VerdictFormatError(f"the answer reached max_tokens before its verdict: {cut_middle(text, 300)!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or value.get("verdict") not in ("PASS", "FAIL") \
            or not isinstance(value.get("explanation", ""), str):
        raise VerdictFormatError('no JSON verdict {"explanation": ..., "verdict": "PASS" | "FAIL"} in the answer: '
                                 f"{cut_middle(text, 300)!r}")
    return (1.0 if value["verdict"] == "PASS" else 0.0), value.get("explanation", "").strip()


def parse_verdict(text: str) -> tuple[float, str]:
    """(score, explanation) from an answer whose last non-empty line is exactly `VERDICT: PASS` or
    `VERDICT: FAIL`, and which has no other verdict line (an ambiguous answer is not a verdict)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    verdict_lines = [line for line in lines if line.startswith("VERDICT")]
    if not lines or not _VERDICT.match(lines[-1]) or len(verdict_lines) != 1:
        raise VerdictFormatError(
            f"no strict final verdict line in the answer: {cut_middle(text, 300)!r}")
    return (1.0 if lines[-1].endswith("PASS") else 0.0), "\n".join(lines[:-1]).strip()


class LLMJudge:
    name = "llm"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0, max_attempts: int = 4,
                 backoff_s: float = 2.0, max_backoff_s: float = 60.0, temperature: float = 0.0,
                 max_tokens: int = 2048, max_file_chars: int = 20_000,
                 max_evidence_chars: int = 120_000, max_task_chars: int = 60_000,
                 extra_body: dict[str, Any] | None = None, verdict_format: str = "text"):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if verdict_format not in VERDICT_FORMATS:
            raise ValueError(f"LLMJudge verdict_format={verdict_format!r}: one of {list(VERDICT_FORMATS)}")
        self.verdict_format = verdict_format
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_file_chars = max_file_chars
        self.max_evidence_chars = max_evidence_chars
        self.max_task_chars = max_task_chars
        self.extra_body = dict(extra_body or {})
        # Ancestors' requirements per leaf key (ids may repeat), set through with_ancestors(); optional.
        self._ancestors: dict[str, list[str]] = {}

    def accepts(self, leaf: RubricNode) -> bool:
        return True

    def with_ancestors(self, rubric: RubricNode) -> "LLMJudge":
        """Lets prompts show each leaf's parent requirements (context PaperBench's judge also gets)."""
        def visit(node: RubricNode, path: list[str]) -> None:
            if node.is_leaf:
                self._ancestors[node.key] = path
            for child in node.sub_tasks:
                visit(child, path + [node.requirements])
        visit(ensure_keys(rubric), [])
        return self

    def build_messages(self, leaf: RubricNode, context: GradingContext) -> tuple[list[dict], list[str]]:
        evidence, files = collect_files(context.episode_dir, leaf.requirements,
                                        max_file_chars=self.max_file_chars,
                                        max_total_chars=self.max_evidence_chars)
        ancestors = self._ancestors.get(leaf.key, [])
        task = cut_middle(context.task, self.max_task_chars) or "(none)"
        parts = [f"# Task given to the agent\n{task}"]
        if ancestors:
            parts.append("# Parent requirements (outermost first)\n" +
                         "\n".join(f"- {a}" for a in ancestors))
        category = ", ".join(c for c in (leaf.task_category, leaf.finegrained_task_category) if c)
        parts.append(f"# Requirement to grade (category: {category})\n{leaf.requirements}")
        parts.append(f"# Submission\n{evidence}")
        if self.verdict_format == "json":
            parts.append('Answer {"explanation": "...", "verdict": "PASS"} or {"explanation": "...", "verdict": '
                         '"FAIL"}.')
            system = SYSTEM_PROMPT_JSON
        else:
            parts.append("End with exactly one line: VERDICT: PASS or VERDICT: FAIL")
            system = SYSTEM_PROMPT
        return [{"role": "system", "content": system},
                {"role": "user", "content": "\n\n".join(parts)}], files

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        try:
            messages, files = self.build_messages(leaf, context)
        except OSError as e:
            return LeafVerdict(0.0, False, f"could not read the submission: {e}", self.name)

        def attempt() -> tuple[float, str, dict]:
            answer, usage, finish = self._complete(messages)
            if self.verdict_format == "json":
                return (*parse_json_verdict(answer, finish), usage)
            return (*parse_verdict(answer), usage)
        try:
            (score, explanation, usage), errors = call_with_retries(
                attempt, max_attempts=self.max_attempts, backoff_s=self.backoff_s,
                max_backoff_s=self.max_backoff_s, retry_on=(TransientError, VerdictFormatError))
        except RetriesExhausted as e:
            return LeafVerdict(0.0, False, f"grading failed after {len(e.errors)} attempt(s): {e.errors[-1]}",
                               self.name, {"model": self.model, "attempts": len(e.errors), "errors": e.errors,
                                           "files": files})
        return LeafVerdict(score, True, explanation, self.name,
                           {"model": self.model, "attempts": len(errors) + 1, "files": files,
                            "usage": usage, "errors": errors})

    def _complete(self, messages: list[dict]) -> tuple[str, dict, str | None]:
        """(content, usage, finish_reason) of one chat completion."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        if self.verdict_format == "json":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}}
        data = post_chat_completions(self.url, body, api_key=self.api_key, timeout_s=self.timeout_s)
        try:
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (KeyError, IndexError, TypeError) as e:
            raise MalformedResponse(f"malformed chat-completions response from {self.url} ({e}): "
                                 f"{json.dumps(data)[:300]!r}") from e
        finish = data["choices"][0].get("finish_reason")
        return content, data.get("usage") or {}, finish if isinstance(finish, str) else None
