"""A scripted OpenAI-compatible endpoint for the factory tests: a real HTTP server on 127.0.0.1 (stdlib
`http.server`, one thread per request) whose answers are a function of the request, so content checks are
deterministic while the client, its retries and its timeouts run for real.

    def script(body: dict, n: int) -> Answer:       # body: the decoded request; n: 0-based request count
        return chat_answer("hello") if n else http_error(500)
    with ScriptedEndpoint(script) as server:
        ChatEndpoint(server.url, "m").chat([...])
    server.requests  # every request body, in arrival order; .headers, .times (monotonic arrival) alike

Answers: `chat_answer(content, reasoning=, tool_calls=[(name, args)], usage=)` (a chat completion),
`http_error(code)`, `garbage(raw_bytes)` (status 200, a body that is no chat completion), `slow(seconds,
answer)` (the answer after a delay, e.g. beyond the client's timeout). `expert_script(tasks)` plays each
embedded task's expert plan (`Task.expert_plan()`), one call per turn.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0


def chat_answer(content: str | None = "", *, reasoning: str | None = None,
                tool_calls: Sequence[tuple[str, Any]] = (), usage: dict | None = USAGE,
                model: str = "scripted", finish_reason: str | None = None) -> Answer:
    """A chat completion. tool_calls: (name, arguments) pairs; arguments as a dict (sent JSON-encoded, as
    OpenAI does) or a str (sent as it is: malformed JSON on purpose)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"tc_{k}", "type": "function",
             "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
            for k, (name, args) in enumerate(tool_calls)]
    body: dict[str, Any] = {"id": "chatcmpl-scripted", "object": "chat.completion", "model": model,
                            "choices": [{"index": 0, "message": message,
                                         "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}]}
    if usage is not None:
        body["usage"] = usage
    return Answer(200, json.dumps(body).encode())


def http_error(code: int) -> Answer:
    return Answer(code, json.dumps({"error": {"message": f"scripted {code}"}}).encode())


def garbage(raw: bytes = b"<html>not json") -> Answer:
    return Answer(200, raw)


def slow(seconds: float, answer: Answer) -> Answer:
    return dataclasses.replace(answer, delay_s=seconds)


class ScriptedEndpoint:
    def __init__(self, script: Callable[[dict, int], Answer]):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.times.append(time.monotonic())
                if self.path != "/v1/chat/completions":
                    answer = http_error(404)
                else:
                    answer = outer.script(body, n)
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass   # a client that timed out and hung up is part of the script

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------
# Agent scripts: which task and which turn a request is for

_CALL_TURN = re.compile(r"^call_(\d{4})_\d+$")


def task_of(body: dict, tasks) -> Any:
    """The task whose spec is the request's first user message (the episode's prefix)."""
    first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return next(t for t in tasks if t.spec == first_user)


def turn_of(body: dict) -> int:
    """The turn asked for: one past the latest turn whose call is in the context. The agent's parser names
    calls `call_{turn:04d}_{k}`, so this holds even when the context policy has dropped early turns."""
    turns = [int(m.group(1)) for msg in body["messages"] if msg["role"] == "assistant"
             for call in msg.get("tool_calls") or () if (m := _CALL_TURN.match(call["id"]))]
    return max(turns) + 1 if turns else 0


def expert_answer(task, turn: int) -> Answer:
    """The expert's planned call number `turn` (no mistakes) as a chat completion with one tool call."""
    action = task.expert_plan()[turn]
    return chat_answer(action.content, reasoning=action.reasoning, tool_calls=[(action.tool, action.arguments)])


def expert_script(tasks) -> Callable[[dict, int], Answer]:
    return lambda body, n: expert_answer(task_of(body, tasks), turn_of(body))
