"""`hybrid serve`: an OpenAI-compatible HTTP server for one engine.

Requests queue for the engine (one generation at a time, on one worker thread); the queue is bounded and a full
queue answers 429. A streaming client that disconnects cancels its generation at the next token. Every error is
a 4xx/5xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}} and the server keeps serving.
A thinking model's reasoning goes to `reasoning_content` (message and stream deltas, as vLLM and SGLang do).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .conversation import ChatSession, ContextLengthError, ThinkingSwitchError

log = logging.getLogger("hybrid.server")

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(value, name: str, default, lo: float, hi: float, integer: bool = False):
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(400, f"messages[{i}].content must be a string, an array of parts or null", "messages")
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise ApiError(400, f"messages[{i}].content parts must be objects", "messages")
        if not isinstance(m.get("reasoning_content") or "", str):
            raise ApiError(400, f"messages[{i}].reasoning_content must be a string or null", "messages")
    # OpenAI's newer "developer" role is K2's system role
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def _validate_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}].function.name must be a non-empty string", "tools")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
    return tools or None


def _thinking(kwargs) -> bool | None:
    """`thinking` from vLLM's `chat_template_kwargs`, the one template variable this server passes on."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    if set(kwargs) - {"thinking"}:
        raise ApiError(400, f"'chat_template_kwargs' supports only 'thinking', got {', '.join(sorted(kwargs))}",
                       "chat_template_kwargs")  # fmt: skip
    thinking = kwargs.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise ApiError(400, f"'chat_template_kwargs.thinking' must be a boolean, got {thinking!r}",
                       "chat_template_kwargs")  # fmt: skip
    return thinking


def parse_request(body, model_name: str) -> dict:
    """Validated generation arguments from a /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{model_name}'", "model",
                       "model_not_found", "not_found_error")  # fmt: skip
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    tools = _validate_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not isinstance(choice, dict):
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or an object", "tool_choice")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "messages": _validate_messages(body.get("messages")),
        "tools": None if choice == "none" else tools,
        "max_tokens": _number(max_tokens, "max_tokens", 512, 1, 1 << 20, integer=True),
        "temperature": float(_number(body.get("temperature"), "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body.get("top_p"), "top_p", 1.0, 1e-9, 1.0)),
        "seed": _number(body.get("seed"), "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        "stop": stop or [],
        "stream": stream,
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage")),
        "thinking": _thinking(body.get("chat_template_kwargs")),
    }


class Server:
    """Owns the session, the single generation thread and the bounded queue."""

    def __init__(self, session: ChatSession, model_name: str, api_key: str | None = None, max_queue: int = 8):
        self.session, self.model_name, self.api_key, self.max_queue = session, model_name, api_key, max_queue
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.in_flight = 0  # queued + running requests

    def admit(self) -> None:
        with self.lock:
            if self.in_flight >= self.max_queue:
                raise ApiError(429, f"the server is busy ({self.in_flight} requests queued or running); retry later",
                               code="queue_full", kind="rate_limit_error")  # fmt: skip
            self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def run(self, args: dict, cancel: threading.Event, sink) -> None:
        """On the worker thread: generate and hand each event to `sink` (never raises)."""
        try:
            if cancel.is_set():
                return
            kwargs = {k: args[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")}
            for ev in self.session.stream(args["ids"], cancel=cancel, **kwargs):
                sink(ev)
                if ev.kind == "done":
                    self._log(ev)
        except Exception as e:  # a failing request must not take the server down
            sink(ApiError(500, f"generation failed: {e}", kind="server_error"))
        finally:
            self.release()


    def _log(self, done) -> None:
        u = done.usage
        cache = self.session.engine.prefix_cache
        log.info("request: %d prompt tokens (%d from the prefix cache), %d generated, %s%s", u["prompt_tokens"],
                 u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"], done.finish_reason,
                 f"; {cache.report()}" if cache is not None else "")  # fmt: skip


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error").response()

    def check_key(request: Request) -> None:
        if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "in_flight": server.in_flight}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list",
                "data": [{"id": server.model_name, "object": "model", "created": 0, "owned_by": "hybrid"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        args = parse_request(body, server.model_name)
        try:  # before queueing, so a stream never starts on a request that cannot run
            args["ids"] = server.session.check_context(args["messages"], args["tools"], args["max_tokens"],
                                                       args["thinking"])  # fmt: skip
        except ContextLengthError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ThinkingSwitchError as e:
            raise ApiError(400, str(e), "chat_template_kwargs") from None
        server.admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        server.worker.submit(server.run, args, cancel, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        meta = {"id": _completion_id(), "created": int(time.time()), "model": server.model_name}
        if args["stream"]:
            return StreamingResponse(_sse(events, cancel, meta, args["include_usage"]), media_type="text/event-stream")
        try:
            return await _collect(events, meta, server.session.thinking)
        except asyncio.CancelledError:
            cancel.set()
            raise

    return app


async def _collect(events: asyncio.Queue, meta: dict, thinking: bool) -> dict:
    content, reasoning, calls = [], [], []
    while True:
        ev = await events.get()
        if isinstance(ev, ApiError):
            raise ev
        if ev.kind == "content":
            content.append(ev.text)
        elif ev.kind == "reasoning":
            reasoning.append(ev.text)
        elif ev.kind == "tool_call":
            calls.append(ev.tool_call.to_openai())
        else:
            message = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
            if thinking:  # a model without reasoning answers exactly as before
                message["reasoning_content"] = "".join(reasoning) or None
            if calls:
                message["tool_calls"] = calls
            return {**meta, "object": "chat.completion", "usage": ev.usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": ev.finish_reason}]}  # fmt: skip


async def _sse(events: asyncio.Queue, cancel: threading.Event, meta: dict, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await events.get()
            if isinstance(ev, ApiError):  # after the headers went out: report in-band, then end
                yield f"data: {json.dumps({'error': {'message': ev.message, 'type': ev.kind}})}\n\n"
                break
            if ev.kind == "content":
                yield chunk({"content": ev.text})
            elif ev.kind == "reasoning":
                yield chunk({"reasoning_content": ev.text})
            elif ev.kind == "tool_call":
                call = {"index": ev.index, **ev.tool_call.to_openai()}
                yield chunk({"tool_calls": [call]})
            else:
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield chunk({}, usage=ev.usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a client gone mid-stream stops its generation at the next token
