"""LLMJudge: grades a leaf by asking a model behind any OpenAI-compatible chat-completions endpoint.

Plain HTTP (urllib), so any server speaking POST {base_url}/chat/completions works (vLLM, SGLang, our
own server, OpenAI). The model sees the task, the requirement with its ancestors' requirements, and a
bounded selection of the submission's files, and must end its answer with a line `VERDICT: PASS` or
`VERDICT: FAIL`. Transport errors, HTTP 429/5xx, timeouts and answers without a strict verdict are
retried with exponential back-off; when every attempt fails the leaf scores 0 with valid = False.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

from klong_jax.rubric.evidence import collect_files, cut_middle
from klong_jax.rubric.grading import GradingContext, LeafVerdict
from klong_jax.rubric.tree import RubricNode

SYSTEM_PROMPT = (
    "You grade one requirement of a research-paper reproduction. You are given the task the agent was "
    "set, the requirement (with the requirements of its parent nodes for context), and files from the "
    "agent's submission. Decide whether the submission satisfies THIS requirement, judging only from "
    "the evidence shown. Explain briefly, then end your answer with exactly one final line, either\n"
    "VERDICT: PASS\nor\nVERDICT: FAIL")
_VERDICT = re.compile(r"^VERDICT: (PASS|FAIL)$")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class VerdictFormatError(ValueError):
    pass


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
                 extra_body: dict[str, Any] | None = None):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
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
        # Ancestors' requirements per leaf id, set by grade() through with_ancestors(); optional.
        self._ancestors: dict[str, list[str]] = {}

    def accepts(self, leaf: RubricNode) -> bool:
        return True

    def with_ancestors(self, rubric: RubricNode) -> "LLMJudge":
        """Lets prompts show each leaf's parent requirements (context PaperBench's judge also gets)."""
        def visit(node: RubricNode, path: list[str]) -> None:
            if node.is_leaf:
                self._ancestors[node.id] = path
            for child in node.sub_tasks:
                visit(child, path + [node.requirements])
        visit(rubric, [])
        return self

    def build_messages(self, leaf: RubricNode, context: GradingContext) -> tuple[list[dict], list[str]]:
        evidence, files = collect_files(context.episode_dir, leaf.requirements,
                                        max_file_chars=self.max_file_chars,
                                        max_total_chars=self.max_evidence_chars)
        ancestors = self._ancestors.get(leaf.id, [])
        task = cut_middle(context.task, self.max_task_chars) or "(none)"
        parts = [f"# Task given to the agent\n{task}"]
        if ancestors:
            parts.append("# Parent requirements (outermost first)\n" +
                         "\n".join(f"- {a}" for a in ancestors))
        category = ", ".join(c for c in (leaf.task_category, leaf.finegrained_task_category) if c)
        parts.append(f"# Requirement to grade (category: {category})\n{leaf.requirements}")
        parts.append(f"# Submission\n{evidence}")
        parts.append("End with exactly one line: VERDICT: PASS or VERDICT: FAIL")
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "\n\n".join(parts)}], files

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        try:
            messages, files = self.build_messages(leaf, context)
        except OSError as e:
            return LeafVerdict(0.0, False, f"could not read the submission: {e}", self.name)
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                answer, usage = self._complete(messages)
                score, explanation = parse_verdict(answer)
            except _Permanent as e:
                errors.append(str(e))
                break
            except (_Transient, VerdictFormatError) as e:
                errors.append(str(e))
                continue
            return LeafVerdict(score, True, explanation, self.name,
                               {"model": self.model, "attempts": attempt + 1, "files": files,
                                "usage": usage, "errors": errors})
        return LeafVerdict(0.0, False, f"grading failed after {len(errors)} attempt(s): {errors[-1]}",
                           self.name, {"model": self.model, "attempts": len(errors), "errors": errors,
                                       "files": files})

    def _complete(self, messages: list[dict]) -> tuple[str, dict]:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            error = f"HTTP {e.code} from {self.url}: {detail}"
            raise (_Transient if e.code in _RETRY_STATUS else _Permanent)(error) from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise _Transient(f"request to {self.url} failed: {type(e).__name__}: {e}") from e
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Transient(f"malformed chat-completions response ({e}): "
                             f"{raw[:300].decode(errors='replace')!r}") from e
        return content, data.get("usage") or {}


class _Transient(Exception):
    pass


class _Permanent(Exception):
    pass
