"""`hybrid serve`: an OpenAI-compatible HTTP server for one engine.

The event loop only does I/O: a request's body is read there (capped at --max-request-bytes, else 413), then parsed
and validated against the request schema (hybrid/api_schema.py), rendered and tokenized on a `prepare` thread, and
generated on the one `generate` thread. Requests being prepared, queued or generated count against --max-queue; past
it the answer is 429 with Retry-After. A client that disconnects, streaming or not, stops its generation at the next
token and frees its slot. Every error is a 4xx/5xx with an OpenAI-style body {"error": {"message", "type", "param",
"code"}} (a 500 also logs its traceback) and the server keeps serving. A thinking model's reasoning goes to
`reasoning_content` (message and stream deltas, as vLLM and SGLang do).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .api_schema import REQUEST_BODY, ApiError, generation_args, openapi_components, parse_body
from .chat import ChatFormatError
from .conversation import ChatSession, ThinkingSwitchError

log = logging.getLogger("hybrid.server")

DEFAULT_MAX_REQUEST_BYTES = 16 << 20


class Server:
    """Owns the session, the prepare and generate threads and the bounded queue."""

    def __init__(self, session: ChatSession, model_name: str, api_key: str | None = None, max_queue: int = 8,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):  # fmt: skip
        self.session, self.model_name, self.api_key, self.max_queue = session, model_name, api_key, max_queue
        self.max_request_bytes = max_request_bytes
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.preparer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        self.lock = threading.Lock()
        self.in_flight = 0  # requests being prepared, queued or generated

    def admit(self) -> None:
        with self.lock:
            if self.in_flight >= self.max_queue:
                raise ApiError(429, f"the server is busy ({self.in_flight} requests queued or running); retry later",
                               code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})  # fmt: skip
            self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def prepare(self, raw: bytes) -> dict:
        """On a prepare thread: body -> generation arguments with the prompt's token ids (or ApiError)."""
        args = generation_args(parse_body(raw), self.model_name)
        try:
            ids = self.session.prompt_ids(args["messages"], args["tools"], args["thinking"])
        except ThinkingSwitchError as e:
            raise ApiError(400, str(e), "chat_template_kwargs") from None
        except (ChatFormatError, TemplateError) as e:
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        context, wanted = self.session.max_context, args["max_tokens"]
        if len(ids) + (wanted or 1) > context:
            what = f"plus max_tokens ({wanted}) exceeds" if wanted else "leaves no room to answer in"
            raise ApiError(400, f"prompt ({len(ids)} tokens) {what} the context of {context}", "messages",
                           "context_length_exceeded")  # fmt: skip
        args["ids"], args["max_tokens"] = ids, wanted or context - len(ids)
        return args

    def run(self, args: dict, cancel: threading.Event, sink) -> None:
        """On the generate thread: generate and hand each event to `sink` (never raises)."""
        try:
            if cancel.is_set():  # its client left while it queued
                sink(ApiError(400, "the client disconnected before generation started"))
                return
            kwargs = {k: args[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")}
            if args["top_logprobs"] is not None:
                kwargs["top_logprobs"] = args["top_logprobs"]
            for ev in self.session.stream(args["ids"], cancel=cancel, **kwargs):
                sink(ev)
                if ev.kind == "done":
                    self._log(ev)
        except Exception as e:  # a failing request must not take the server down
            log.exception("generation failed")
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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives; past `limit` bytes (or a Content-Length saying so) a 413."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
                         code="request_too_large")  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request") from None
    return b"".join(chunks)


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Non-streaming: the body is read, so the next ASGI message is the client hanging up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return ApiError(400, f"invalid request: {errors[0].get('msg') if errors else exc}").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # logged with its traceback by Starlette too
        log.error("unexpected error on %s %s: %r", request.method, request.url.path, exc)
        return ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error").response()

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def check_key(request: Request) -> None:
        if not server.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # header values arrive latin-1 decoded: back to their bytes, against the key's UTF-8
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"),
                                                                 server.api_key.encode()):  # fmt: skip
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

    @app.post("/v1/chat/completions", openapi_extra=REQUEST_BODY)
    async def chat_completions(request: Request):
        check_key(request)
        raw = await read_body(request, server.max_request_bytes)
        server.admit()
        loop = asyncio.get_running_loop()
        try:  # before queueing, so a stream never starts on a request that cannot run
            args = await loop.run_in_executor(server.preparer, server.prepare, raw)
        except BaseException:
            server.release()
            raise
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        server.worker.submit(server.run, args, cancel, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        meta = {"id": _completion_id(), "created": int(time.time()), "model": server.model_name}
        logprobs = args["top_logprobs"] is not None
        if args["stream"]:
            return StreamingResponse(_sse(events, cancel, meta, args["include_usage"], logprobs),
                                     media_type="text/event-stream")  # fmt: skip
        watch = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            return await _collect(events, meta, server.session.thinking, logprobs)
        finally:
            watch.cancel()
            cancel.set()  # a no-op after the last token; on a cancelled request it stops the generation

    return app


def _logprobs(kind: str, ev) -> dict:
    """A delta's `logprobs`: content tokens under `content` (OpenAI), reasoning tokens under `reasoning_content`."""
    entries = getattr(ev, "logprobs", None) or []
    if kind == "reasoning":
        return {"content": None, "reasoning_content": entries, "refusal": None}
    return {"content": entries, "refusal": None}


async def _collect(events: asyncio.Queue, meta: dict, thinking: bool, logprobs: bool) -> dict:
    text = {"content": [], "reasoning": []}
    probs = {"content": [], "reasoning": []}
    calls = []
    while True:
        ev = await events.get()
        if isinstance(ev, ApiError):
            raise ev
        if ev.kind in text:
            text[ev.kind].append(ev.text)
            probs[ev.kind] += getattr(ev, "logprobs", None) or []
        elif ev.kind == "tool_call":
            calls.append(ev.tool_call.to_openai())
        else:
            message = {"role": "assistant", "content": "".join(text["content"]) or (None if calls else "")}
            if thinking:  # a model without reasoning answers exactly as before
                message["reasoning_content"] = "".join(text["reasoning"]) or None
            if calls:
                message["tool_calls"] = calls
            lp = None
            if logprobs:
                lp = {"content": probs["content"], "refusal": None}
                if thinking:
                    lp["reasoning_content"] = probs["reasoning"]
            return {**meta, "object": "chat.completion", "usage": ev.usage,
                    "choices": [{"index": 0, "message": message, "logprobs": lp,
                                 "finish_reason": ev.finish_reason}]}  # fmt: skip


async def _sse(events: asyncio.Queue, cancel: threading.Event, meta: dict, include_usage: bool, logprobs: bool):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, lp: dict | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]
                if usage is None else []}  # fmt: skip
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
            if ev.kind in ("content", "reasoning"):
                field = "content" if ev.kind == "content" else "reasoning_content"
                yield chunk({field: ev.text}, lp=_logprobs(ev.kind, ev) if logprobs else None)
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
