"""The OpenAI-compatible server: ChatEngine (template + batching queue + sampler), the FastAPI app, and
ServerThread to run it inside a process (tests, LLMJudge experiments) without a separate launcher.

    engine = ChatEngine(Sampler(model, tokenizer), model_name="klong")
    with ServerThread(create_app(engine)) as server:      # 127.0.0.1, a free port
        openai.OpenAI(base_url=server.url, api_key="x").chat.completions.create(...)

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health, GET /stats (batch sizes so far).
`stream: true` is answered as server-sent events once generation has finished (the whole message in
one delta: the sampler does not yet hand out tokens mid-generation). `response_format` (json_schema,
json_object) decodes the answer under the schema's grammar: one JsonConstraint per schema, kept across requests
with its mask cache; the vocabulary's texts are read once, on the first such request.
"""
from __future__ import annotations

import asyncio
import collections
import json
import socket
import threading
import time
import uuid
from collections.abc import Mapping

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from klong_jax.data.chat_template import make_chat_template
from klong_jax.sampling.constraint import JsonConstraint, TokenVocab
from klong_jax.sampling.json_schema import SchemaError, compile_schema
from klong_jax.serving import openai_api
from klong_jax.serving.batching import BatchQueue


class ChatEngine:
    """Turns chat-completions request bodies into batched sampler calls and back."""

    def __init__(self, sampler, tokenizer=None, *, model_name: str = "klong-jax", batch_window_ms: float = 5.0,
                 max_batch: int = 32, default_max_tokens: int = 512, chat_template: str = "auto"):
        """chat_template: "auto" | "glm45" | "chatml" (klong_jax.data.chat_template.make_chat_template)."""
        tokenizer = tokenizer if tokenizer is not None else sampler.tokenizer
        if tokenizer is None:
            raise ValueError("ChatEngine needs a tokenizer (pass one, or build the Sampler with one)")
        self.template = make_chat_template(tokenizer, chat_template, field="chat_template")
        self.sampler, self.model_name, self.default_max_tokens = sampler, model_name, default_max_tokens
        self.queue = BatchQueue(sampler.generate, window_s=batch_window_ms / 1000.0, max_batch=max_batch)
        self._vocab: TokenVocab | None = None           # built on the first constrained request
        self._constraints: collections.OrderedDict[str, JsonConstraint] = collections.OrderedDict()
        self._constraint_lock = threading.Lock()

    def close(self) -> None:
        self.queue.close()

    def json_constraint(self, schema: Mapping) -> JsonConstraint:
        """The constraint of a response_format schema, shared by the requests that ask for the same schema (its
        mask cache with it; the 32 last schemas kept); RequestError for a schema the grammar cannot follow."""
        key = json.dumps(schema, sort_keys=True)
        with self._constraint_lock:
            if key in self._constraints:
                self._constraints.move_to_end(key)
                return self._constraints[key]
            try:
                grammar = compile_schema(schema)
            except SchemaError as e:
                raise openai_api.RequestError(f"response_format: {e}", "response_format") from None
            if self._vocab is None:
                self._vocab = TokenVocab.from_tokenizer(self.template.tokenizer, self.sampler.cfg.vocab_size)
            constraint = self._constraints[key] = JsonConstraint(grammar, self._vocab, self.template.stop_ids)
            while len(self._constraints) > 32:
                self._constraints.popitem(last=False)
            return constraint

    def prepare(self, body: Mapping) -> tuple[list, list[dict], list[int]]:
        """(rows for the queue, tools, prompt ids) of a request; RequestError when malformed."""
        if not isinstance(body, Mapping):
            raise openai_api.RequestError("the request body must be a JSON object")
        messages = openai_api.parse_messages(body.get("messages"))
        tools = openai_api.parse_tools(body.get("tools"))
        if body.get("tool_choice") == "none":
            tools = []
        ids = openai_api.prompt_ids(self.template, messages, tools)
        params, n = openai_api.sampling_params(body, self.template.stop_ids, self.default_max_tokens)
        schema = openai_api.response_format(body)
        if schema is not None:
            params = params.replace(constraint=self.json_constraint(schema))
        try:    # checked here: a bad request must not fail the batch it would join
            self.sampler.check_request(ids, params)
        except ValueError as e:
            raise openai_api.RequestError(str(e), "messages") from None
        rows = [(ids, params if params.seed is None else params.replace(seed=(params.seed + k) % (2**31 - 1)))
                for k in range(n)]
        return rows, tools, ids

    async def complete(self, body: Mapping) -> dict:
        rows, tools, ids = self.prepare(body)
        completions = await asyncio.wrap_future(self.queue.submit(rows))
        choices = [openai_api.choice(self.template, i, c, tools, logprobs=bool(body.get("logprobs")))
                   for i, c in enumerate(completions)]
        generated = sum(len(c.tokens) for c in completions)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": generated,
                          "total_tokens": len(ids) + generated}}


def _stream_events(response: dict, include_usage: bool):
    """A finished response as chat.completion.chunk server-sent events."""
    base = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    for ch in response["choices"]:
        msg = ch["message"]
        delta = {"role": "assistant", "content": msg.get("content")}
        if "reasoning_content" in msg:
            delta["reasoning_content"] = msg["reasoning_content"]
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
        for d, finish in ((delta, None), ({}, ch["finish_reason"])):
            chunk = base | {"choices": [{"index": ch["index"], "delta": d, "finish_reason": finish}]}
            yield f"data: {json.dumps(chunk)}\n\n"
    if include_usage:
        yield f"data: {json.dumps(base | {'choices': [], 'usage': response['usage']})}\n\n"
    yield "data: [DONE]\n\n"


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "param": param, "code": None}})


def create_app(engine: ChatEngine) -> FastAPI:
    app = FastAPI(title="klong-jax OpenAI-compatible server")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return _error(400, f"the request body is not JSON: {e}")
        try:
            response = await engine.complete(body)
        except openai_api.RequestError as e:
            return _error(400, str(e), e.param)
        except ValueError as e:      # the sampler rejects the request (e.g. too long for the model)
            return _error(400, str(e))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream_events(response, include_usage), media_type="text/event-stream")
        return response

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "klong-jax"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return engine.queue.stats()

    return app


class ServerThread:
    """uvicorn serving `app` from a background thread, on a socket bound before it starts (port 0: a
    free port, no race). `url` is the OpenAI base URL (".../v1")."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
