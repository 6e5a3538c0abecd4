"""The factory's chat endpoint client and the top-down rubric drafter, against a scripted endpoint (a real HTTP
server on 127.0.0.1, tests/factory_endpoints.py) for the content checks, and against the project's own
launch/serve.py serving SmolLM2-135M for the plumbing (real HTTP, real model)."""
import json
import os
import re
import socket
import uuid

import pytest

from factory_endpoints import ScriptedEndpoint, chat_answer, garbage, http_error, slow, USAGE
from klong_jax.factory.endpoint import ChatEndpoint, EndpointError
from klong_jax.factory.rubric_draft import (DRAFT_CATEGORIES, DraftJSONError, draft_rubric, draft_summary,
                                            extract_json)
from klong_jax.rubric import FINEGRAINED_CATEGORIES, parse_rubric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def endpoint_for(server, **kw) -> ChatEndpoint:
    kw = {"timeout_s": 2.0, "max_attempts": 3, "backoff_s": 0.05, "api_key": "k", **kw}
    return ChatEndpoint(server.url, "drafter", **kw)


def script_of(*answers):
    """Answers in order; past the end, HTTP 500."""
    return lambda body, n: answers[n] if n < len(answers) else http_error(500)


# ------------------------------------------------------------------------------------------------
# The endpoint client


def test_endpoint_retries_5xx_with_backoff_then_answers_and_counts_tokens():
    with ScriptedEndpoint(script_of(http_error(500), http_error(503), chat_answer("ok"))) as server:
        endpoint = endpoint_for(server)
        reply = endpoint.chat([{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.0)
    assert reply.content == "ok" and reply.attempts == 3 and len(reply.errors) == 2
    assert "HTTP 500" in reply.errors[0] and "HTTP 503" in reply.errors[1]
    # 3 requests for 1 call: 2 retries; only the answer carried usage (100 prompt, 10 completion tokens).
    assert endpoint.stats.snapshot() == {"requests": 3, "retries": 2, "calls": 1, "failures": 0, "invalid": 0,
                                         "prompt_tokens": 100, "completion_tokens": 10}
    body = server.requests[-1]
    assert body == {"model": "drafter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                    "temperature": 0.0}
    assert server.headers[-1]["Authorization"] == "Bearer k"
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.10      # back-off 0.05 * 2^0, then 0.05 * 2^1


def test_endpoint_timeout_and_garbage_are_retried_then_raise_a_typed_error():
    no_choices = garbage(json.dumps({"choices": [], "usage": USAGE}).encode())
    script = script_of(slow(1.0, chat_answer("late")), garbage(b"<html>busy</html>"), no_choices)
    with ScriptedEndpoint(script) as server:
        endpoint = endpoint_for(server, timeout_s=0.3)
        with pytest.raises(EndpointError) as info:
            endpoint.chat([{"role": "user", "content": "hi"}])
    e = info.value
    assert e.url == server.url + "/chat/completions" and len(e.errors) == 3 and not e.permanent
    assert "timed out" in e.errors[0].lower()
    assert "malformed" in e.errors[1] and "malformed" in e.errors[2] and "'choices'" in e.errors[2]
    assert server.url in str(e) and "after 3 attempt(s)" in str(e)
    stats = endpoint.stats.snapshot()
    # The timed-out answer was never read; the two garbage bodies are invalid; the last one's usage counts.
    assert (stats["requests"], stats["failures"], stats["invalid"], stats["prompt_tokens"]) == (3, 1, 2, 100)


def test_endpoint_retries_answers_the_validator_rejects():
    def validate(reply):
        if not reply.content.strip():
            raise ValueError("empty answer")

    with ScriptedEndpoint(script_of(chat_answer(""), chat_answer("fine"))) as server:
        endpoint = endpoint_for(server)
        reply = endpoint.chat([{"role": "user", "content": "hi"}], validate=validate)
    assert reply.content == "fine" and reply.attempts == 2 and "empty answer" in reply.errors[0]
    stats = endpoint.stats.snapshot()
    # Both answers were paid for: 2 x 100 prompt tokens, 2 x 10 completion tokens.
    assert (stats["requests"], stats["invalid"], stats["prompt_tokens"], stats["completion_tokens"]) == \
        (2, 1, 200, 20)


def test_endpoint_client_error_is_not_retried():
    with ScriptedEndpoint(script_of(http_error(400))) as server:
        endpoint = endpoint_for(server)
        with pytest.raises(EndpointError) as info:
            endpoint.chat([{"role": "user", "content": "hi"}])
    assert info.value.permanent and "HTTP 400" in str(info.value) and "model name" in str(info.value)
    assert len(server.requests) == 1 and endpoint.stats.failures == 1


def test_endpoint_unreachable_server_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again: nothing listens there
    endpoint = ChatEndpoint(f"http://127.0.0.1:{port}/v1", "m", max_attempts=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(EndpointError) as info:
        endpoint.chat([{"role": "user", "content": "hi"}])
    assert len(info.value.errors) == 2 and "refused" in str(info.value).lower()
    assert endpoint.stats.snapshot()["requests"] == 2


def test_endpoint_sends_tools_and_parses_tool_calls():
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    answer = chat_answer(None, reasoning="look first",
                         tool_calls=[("bash", {"cmd": "ls -l"}), ("python", '{"code": "print(1)"')])
    with ScriptedEndpoint(script_of(answer)) as server:
        reply = endpoint_for(server).chat([{"role": "user", "content": "go"}], tools=tools, tool_choice="auto")
    assert server.requests[0]["tools"] == tools and server.requests[0]["tool_choice"] == "auto"
    assert reply.content == "" and reply.reasoning == "look first" and reply.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("bash", {"cmd": "ls -l"}), ("python", None)]
    assert reply.tool_calls[1].raw_arguments == '{"code": "print(1)"'   # kept for the caller's error message


def test_endpoint_rejects_bad_settings():
    with pytest.raises(ValueError, match="base_url"):
        ChatEndpoint("127.0.0.1:8000/v1", "m")
    with pytest.raises(ValueError, match="max_attempts"):
        ChatEndpoint("http://127.0.0.1:8000/v1", "m", max_attempts=0)


# ------------------------------------------------------------------------------------------------
# JSON in a model's answer


@pytest.mark.parametrize("text", [
    '{"sections": [1, 2]}',
    'Here is the rubric:\n```json\n{"sections": [1, 2]}\n```\nHope this helps.',
    'Sure! {"sections": [1, 2]} -- as asked.',
    '<think>maybe {"sections": []} or {bad</think>\n```\n{"sections": [1, 2]}\n```',
    'Plan: {not json}. Answer: {"sections": [1, 2]}',
])
def test_extract_json_finds_the_value(text):
    assert extract_json(text) == {"sections": [1, 2]}


@pytest.mark.parametrize("text", ["", "The sections are A and B.", "```json\n{\"a\": \n```"])
def test_extract_json_without_a_value_says_so(text):
    with pytest.raises(DraftJSONError, match="no JSON object"):
        extract_json(text)


# ------------------------------------------------------------------------------------------------
# Drafting


PAPER = "# Sparse Widgets\n\nWe propose sparse widgets and train them on CIFAR-10 (accuracy 91.2%).\n"
SECTIONS = [{"requirements": "Sparse widgets are implemented", "weight": 3},
            {"requirements": "The CIFAR-10 experiment is reproduced", "weight": 2}]
SUBTASKS = [{"requirements": "The widget layer", "weight": 1}, {"requirements": "The sparsity schedule", "weight": 2}]
CRITERIA = [{"requirements": "widget.py defines the layer", "task_category": "Code Development",
             "finegrained_task_category": "Method Implementation", "weight": 2},
            {"requirements": "The log shows 91% accuracy", "task_category": "Result Analysis",
             "finegrained_task_category": "Evaluation, Metrics & Benchmarking", "weight": 1}]


def step_of(body) -> str:
    question = body["messages"][1]["content"]
    for marker, step in (("List the main sections", "sections"), ("Split it into subtasks", "subtasks"),
                         ("Write the leaf criteria", "criteria")):
        if marker in question:
            return step
    raise AssertionError(f"unknown drafting step: {question[-300:]}")


def rubric_script(bad_first: dict | None = None):
    """Valid answers for every step (2 sections x 2 subtasks x 2 criteria); `bad_first`: step -> the answer
    text given the first time that step is asked (then the valid one)."""
    asked = set()
    good = {"sections": {"sections": SECTIONS}, "subtasks": {"subtasks": SUBTASKS}, "criteria": {"criteria": CRITERIA}}

    def script(body, n):
        step = step_of(body)
        if bad_first and step in bad_first and step not in asked:
            asked.add(step)
            return chat_answer(bad_first[step])
        return chat_answer(f"Here you go:\n```json\n{json.dumps(good[step])}\n```")
    return script


def test_each_drafting_call_sends_its_json_schema_and_the_schema_takes_the_answers():
    """Every call carries response_format with its step's schema (under which a constrained server decodes), the
    scripted valid answers are texts that schema's grammar accepts, and json_schema=False sends none."""
    from klong_jax.sampling.json_schema import compile_schema
    good = {"sections": {"sections": SECTIONS}, "subtasks": {"subtasks": SUBTASKS}, "criteria": {"criteria": CRITERIA}}
    with ScriptedEndpoint(rubric_script()) as server:
        assert draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets").ok
        assert draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets", json_schema=False).ok
    with_schema, without = server.requests[:7], server.requests[7:]
    for body in with_schema:
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        step = step_of(body)
        assert fmt["json_schema"]["name"] == f"rubric_{step}"
        assert compile_schema(fmt["json_schema"]["schema"]).accepts(json.dumps(good[step], indent=2))
    assert len(without) == 7 and all("response_format" not in body for body in without)


def test_an_answer_cut_at_max_tokens_is_retried_with_that_reason():
    """Under a schema a whole answer ends by itself; one cut at max_tokens is named as such (here its inner item
    parses as an object, which would otherwise be read as the answer), then the retry loads."""
    cut = '{"sections": [{"requirements": "The model", "weight": 1}, {"requirements": "The trai'
    state = {"n": 0}

    def script(body, n):
        if step_of(body) == "sections" and state["n"] == 0:
            state["n"] += 1
            return chat_answer(cut, finish_reason="length")
        return rubric_script()(body, n)

    with ScriptedEndpoint(script) as server:
        draft = draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets", max_tokens=64)
    assert draft.ok and draft.steps[0].attempts == 2
    assert "max_tokens=64 before its JSON was complete" in draft.errors[0]


def test_draft_builds_a_rubric_that_loads_top_down():
    with ScriptedEndpoint(rubric_script()) as server:
        endpoint = endpoint_for(server)
        draft = draft_rubric(endpoint, PAPER, "Sparse Widgets")
    assert draft.ok and draft.failure is None and draft.errors == []
    root = parse_rubric(draft.rubric)
    # 1 sections call + 2 subtasks calls + 2 x 2 criteria calls = 7 calls, each 100 + 10 tokens.
    assert draft.attempts == 7 == len(server.requests)
    assert (draft.prompt_tokens, draft.completion_tokens) == (700, 70)
    assert [s.name for s in draft.steps] == ["sections", "subtasks[0]", "criteria[0.0]", "criteria[0.1]",
                                             "subtasks[1]", "criteria[1.0]", "criteria[1.1]"]
    assert [n.requirements for n in root.sub_tasks] == [s["requirements"] for s in SECTIONS]
    assert [n.weight for n in root.sub_tasks] == [3, 2]
    leaves = list(root.leaves())
    assert len(leaves) == 2 * 2 * 2 == draft.n_leaves
    assert {leaf.task_category for leaf in leaves} <= set(DRAFT_CATEGORIES)
    assert {leaf.finegrained_task_category for leaf in leaves} <= set(FINEGRAINED_CATEGORIES)
    ids = [node.id for node in root.walk()]
    assert len(set(ids)) == len(ids) == 1 + 2 + 4 + 8
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert all(n.task_category is None for n in root.walk() if not n.is_leaf)
    # Each call shows the paper; deeper calls name their parents.
    assert all("accuracy 91.2%" in r["messages"][1]["content"] for r in server.requests)
    criteria_question = server.requests[2]["messages"][1]["content"]
    assert "Sparse widgets are implemented" in criteria_question and "The widget layer" in criteria_question
    json.dumps(draft.to_dict())   # the report is JSON


def test_an_invalid_answer_is_retried_with_the_loaders_error():
    bad = {"sections": json.dumps({"sections": [{"requirements": "A", "weight": 2.5}]}),
           "criteria": json.dumps({"criteria": [{"requirements": "x", "task_category": "Coding", "weight": 1}]})}
    with ScriptedEndpoint(rubric_script(bad)) as server:
        draft = draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets")
    assert draft.ok
    sections_step, first_criteria = draft.steps[0], draft.steps[2]
    assert (sections_step.attempts, first_criteria.attempts) == (2, 2)
    assert "'weight' must be a non-negative integer, got 2.5" in sections_step.errors[0]
    assert "a leaf needs 'task_category'" in first_criteria.errors[0] and "'Coding'" in first_criteria.errors[0]
    # The retry is the same conversation plus the bad answer and the loader's message.
    retry = server.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == bad["sections"]
    assert "'weight' must be a non-negative integer, got 2.5" in retry[3]["content"]
    assert draft.attempts == 7 + 2 and len(draft.errors) == 2


def test_a_drafted_leaf_needs_a_drafted_category():
    bad = {"criteria": json.dumps({"criteria": [{"requirements": "x", "task_category": "Subtree",
                                                 "finegrained_task_category": "Method Implementation",
                                                 "weight": 1}]})}
    with ScriptedEndpoint(rubric_script(bad)) as server:
        draft = draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets")
    assert draft.ok and "task_category must be one of" in draft.steps[2].errors[0]


def test_answers_that_never_load_fail_the_draft_with_every_error():
    with ScriptedEndpoint(lambda body, n: chat_answer("The sections are: method, experiments.")) as server:
        draft = draft_rubric(endpoint_for(server), PAPER, "Sparse Widgets", max_attempts=3)
    assert not draft.ok and draft.rubric is None
    assert (draft.failure, draft.failed_step, draft.attempts) == ("invalid", "sections", 3)
    assert len(draft.errors) == 3 and all("no JSON object" in e for e in draft.errors)
    assert len(server.requests) == 3
    # Each retry carries all earlier answers and errors: 2, 4, then 6 messages.
    assert [len(r["messages"]) for r in server.requests] == [2, 4, 6]


def test_a_failing_endpoint_fails_the_draft_as_an_endpoint_failure():
    with ScriptedEndpoint(lambda body, n: http_error(502)) as server:
        endpoint = endpoint_for(server, max_attempts=2)
        draft = draft_rubric(endpoint, PAPER, "Sparse Widgets")
    assert (draft.ok, draft.failure, draft.failed_step, draft.attempts) == (False, "endpoint", "sections", 1)
    assert "EndpointError" in draft.errors[0] and "HTTP 502" in draft.errors[0]
    assert endpoint.stats.snapshot()["requests"] == 2 and endpoint.stats.failures == 1
    summary = draft_summary([draft])
    assert (summary["drafts"], summary["ok"], summary["failed_endpoint"], summary["failed_invalid"]) == (1, 0, 1, 0)


def test_a_long_paper_is_cut_in_the_middle():
    paper = "HEAD-MARK " + "x" * 200_000 + " TAIL-MARK"
    with ScriptedEndpoint(rubric_script()) as server:
        draft = draft_rubric(endpoint_for(server), paper, "Long", max_paper_chars=2_000, reference_code="def f(): pass")
    assert draft.ok
    content = server.requests[0]["messages"][1]["content"]
    assert "HEAD-MARK" in content and "TAIL-MARK" in content and "characters omitted" in content
    assert len(content) < 2_000 + 3_000 and "def f(): pass" in content


# ------------------------------------------------------------------------------------------------
# Plumbing with a real model: launch/serve.py serving SmolLM2-135M-Instruct (about 40 s on 2 busy CPU cores,
# model load and compile included; skipped when the GGUF is not cached)


def test_draft_against_the_served_smol_model_counts_attempts_and_records_failures(smol_server):
    endpoint = ChatEndpoint(smol_server, "smol", timeout_s=300, max_attempts=1)
    draft = draft_rubric(endpoint, PAPER, "Sparse Widgets", max_attempts=2, max_tokens=48, temperature=0.0,
                         max_sections=3, max_subtasks=2, max_criteria=2)
    stats = endpoint.stats.snapshot()
    # Real HTTP to a real model: every chat call of the draft is one request (the endpoint does not retry
    # here), each answered with real usage: prompt tokens of the rendered prompt, at most 48 generated.
    assert draft.attempts == stats["calls"] == stats["requests"] >= 1 and stats["failures"] == 0
    assert stats["prompt_tokens"] > 200 * stats["requests"]
    assert 0 < stats["completion_tokens"] <= 48 * stats["requests"]
    assert (draft.prompt_tokens, draft.completion_tokens) == (stats["prompt_tokens"], stats["completion_tokens"])
    if draft.ok:   # unlikely in 48 tokens per answer, but then it must load
        parse_rubric(draft.rubric)
        return
    # The server decodes under each step's schema, so an answer is whole JSON of the right shape unless 48 tokens
    # cut it: the failure is recorded, with each rejected answer's error (cut at max_tokens, or the loader's
    # message), after max_attempts answers of the failing step.
    assert draft.failure == "invalid" and draft.rubric is None
    failed = next(s for s in draft.steps if s.name == draft.failed_step)
    assert failed.attempts == 2 and len(failed.errors) == 2 and not failed.ok
    known = re.compile(r"before its JSON was complete|no JSON object|expected \{|is empty|has \d+ items|drafted \"|"
                       r"must be")
    assert all(known.search(e) for e in failed.errors), failed.errors
