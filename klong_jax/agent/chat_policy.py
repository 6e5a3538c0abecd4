"""ChatPolicy: the agent driven by a model behind an OpenAI-compatible chat endpoint (a teacher, or a served
model under evaluation), through the same episode loop as the sampler.

    policy = ChatPolicy(endpoint, template, max_workers=8)     # endpoint: klong_jax.factory.endpoint.ChatEndpoint
    results = run_episodes(tasks, policy, n_per_task=G, template=template, config=config, pool=pool, workdir=DIR)

For each turn the endpoint gets the episode's context as chat messages (`TurnRequest.messages`: the prefix
and the turns the ContextPolicy keeps, tool results truncated exactly as in the token prompt) and the agent's
tools as OpenAI function schemas (`tool_schemas()`). Its answer (content, reasoning, tool calls) becomes the
assistant message, and the completion's tokens are that message as the chat template renders it after the
generation prompt (`template.completion_ids`): the episode then parses, runs the tools, applies the context
policy and records the turn unchanged, so the trajectory is exactly what SFT will train on, in the template's
own call format. The system prompt's slot for the call syntax (`TOOL_CALL_FORMAT_SLOT`) is filled with
`tool_call_format` for the endpoint (it calls tools through the API, not in the template's text format).

Per batched step the requests run concurrently (up to max_workers). An endpoint failure (after the endpoint's
own retries) or an answer no retry repaired ends that episode only: its completion carries `error`, the episode
finishes as "error" with that message (counted in `counts`), and the other episodes go on. The endpoint is any
object with `chat(messages, *, tools, max_tokens, temperature, validate) -> reply` (reply: `content`,
`reasoning`, `tool_calls` with `name` and `arguments`) that raises on failure; ChatEndpoint is one.
No log-probs or routing: completions of a chat API are for SFT, not for RL's importance weights.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax.agent.policy import Completion, GenerationParams, TurnRequest
from klong_jax.data.template_base import TOOL_CALL_FORMAT_SLOT, ChatTemplate
from klong_jax.data.trajectory import Message, ToolCall
from klong_jax.tasks import tools as task_tools

log = logging.getLogger(__name__)

TOOL_CALL_FORMAT = "Call a tool with a function call (the tools are given as functions)."


def tool_schemas(specs: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The agent's tools (`klong_jax.tasks.tools.TOOL_SPECS`) as OpenAI function schemas: each parameter's
    JSON type is the first word of its spec ("integer (from 1)" -> integer, described as "from 1"); required
    parameters are those the tool refuses to run without."""
    out = []
    for spec in specs if specs is not None else task_tools.TOOL_SPECS:
        properties = {}
        for key, kind in spec["parameters"].items():
            json_type, _, note = kind.partition(" ")
            properties[key] = {"type": json_type}
            if note.strip("() "):
                properties[key]["description"] = note.strip("() ")
        required = [key for key in task_tools.REQUIRED_ARGUMENTS.get(spec["name"], ()) if key in properties]
        out.append({"type": "function", "function": {
            "name": spec["name"], "description": spec["description"],
            "parameters": {"type": "object", "properties": properties, "required": required}}})
    return out


def openai_messages(messages: Sequence[Message], *, tool_call_format: str = TOOL_CALL_FORMAT,
                    send_reasoning: bool = False) -> list[dict[str, Any]]:
    """Messages in the chat-completions request shape: assistant tool calls as `{"id", "type": "function",
    "function": {"name", "arguments": JSON string}}`, tool results with `tool_call_id`, the system prompt's
    call-syntax slot filled with `tool_call_format`; earlier reasoning as `reasoning_content` only when
    `send_reasoning` (not every API accepts it back)."""
    out = []
    for m in messages:
        content = m.content.replace(TOOL_CALL_FORMAT_SLOT, tool_call_format) if m.role == "system" else m.content
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.role == "assistant":
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                   for c in m.tool_calls]
            if send_reasoning and m.reasoning:
                d["reasoning_content"] = m.reasoning
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def check_turn_reply(reply: Any) -> None:
    """The validator of a turn's answer: ValueError (retried by the endpoint) for an empty answer (no content,
    no tool call) or a tool call without a name or whose arguments are not a JSON object."""
    calls = tuple(getattr(reply, "tool_calls", ()) or ())
    if not (getattr(reply, "content", "") or "").strip() and not calls:
        raise ValueError("empty answer: neither content nor a tool call")
    for k, call in enumerate(calls):
        if not call.name:
            raise ValueError(f"tool_calls[{k}] has an empty function name")
        if not isinstance(call.arguments, dict):
            raw = getattr(call, "raw_arguments", call.arguments)
            raise ValueError(f"tool_calls[{k}] ({call.name}): arguments are not a JSON object: {str(raw)[:200]!r}")


def reply_message(reply: Any) -> Message:
    """The assistant message of an endpoint's answer (call ids are renamed by the episode's parser)."""
    calls = tuple(ToolCall(getattr(c, "id", None) or f"call_{k}", c.name, dict(c.arguments))
                  for k, c in enumerate(reply.tool_calls))
    return Message("assistant", reply.content or "", reply.reasoning or None, calls)


class ChatPolicy:
    def __init__(self, endpoint: Any, template: ChatTemplate, *, tools: Sequence[Mapping] | None = None,
                 max_workers: int = 8, max_tokens: int | None = None, temperature: float | None = None,
                 tool_call_format: str = TOOL_CALL_FORMAT, send_reasoning: bool = False):
        """template: the chat template the episodes run with (the trained model's). tools: function schemas
        (default: `tool_schemas()`). max_tokens: cap on a turn's answer sent to the endpoint (also capped by
        the request's own limit; counted by the endpoint's tokenizer, while the episode cuts at the
        template's: a longer message is cut off there and reported to the model). temperature: None: the
        agent config's (GenerationParams.temperature)."""
        if max_workers < 1:
            raise ValueError(f"ChatPolicy max_workers={max_workers} must be >= 1")
        self.endpoint = endpoint
        self.template = template
        self.tools = list(tools) if tools is not None else tool_schemas()
        self.max_workers = max_workers
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.tool_call_format = tool_call_format
        self.send_reasoning = send_reasoning
        self._lock = threading.Lock()
        # turns: answers turned into completions; failed_turns: turns that ended their episode as an error.
        # (Not named `stats`: run_episodes reads a policy's `stats` as the sampler's prefill counters.)
        self.counts = {"turns": 0, "failed_turns": 0}
        self.errors: list[tuple[str, int, str]] = []    # (episode id, turn, error) of every failed turn

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams, *,
                 requests: Sequence[TurnRequest] | None = None) -> list[Completion]:
        if requests is None or len(requests) != len(prompts):
            raise ValueError("ChatPolicy sends each request's messages: give one TurnRequest per prompt")
        missing = [r.episode_id for r in requests if r.messages is None]
        if missing:
            raise ValueError(f"ChatPolicy: TurnRequest.messages is None for episode(s) {missing[:3]}: it sends "
                             "the context as messages (AgentEpisode.next_request fills them)")
        if len(requests) == 1:
            return [self._turn(requests[0], params)]
        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(requests))) as pool:
            return list(pool.map(lambda r: self._turn(r, params), requests))

    def _turn(self, request: TurnRequest, params: GenerationParams) -> Completion:
        limit = min(request.max_new_tokens, params.max_new_tokens)
        if self.max_tokens is not None:
            limit = min(limit, self.max_tokens)
        temperature = self.temperature if self.temperature is not None else params.temperature
        try:
            reply = self.endpoint.chat(
                openai_messages(request.messages, tool_call_format=self.tool_call_format,
                                send_reasoning=self.send_reasoning),
                tools=self.tools, max_tokens=limit, temperature=temperature, validate=check_turn_reply)
            ids = self.template.completion_ids(reply_message(reply))
        except Exception as e:   # one episode's failure, never the batch's: it ends as an error
            error = f"{type(e).__name__}: {e}"
            log.warning("episode %s turn %d: no answer from the chat endpoint: %s", request.episode_id,
                        request.turn, error)
            with self._lock:
                self.counts["failed_turns"] += 1
                self.errors.append((request.episode_id, request.turn, error))
            return Completion([], error=error)
        with self._lock:
            self.counts["turns"] += 1
        return Completion(ids, finish_reason="stop")
