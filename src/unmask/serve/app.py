"""The HTTP side: OpenAI-compatible routes over the engine.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.
A request is parsed (`protocol`), validated and tokenised by the engine in a worker thread, queued,
and answered from the events the engine's decode thread sends back; the event loop never runs a
model call. Every refusal is OpenAI's error object with a 4xx status (429 when the queue is full,
413 for a body over `max_body_bytes`, judged on Content-Length and on the bytes read); a decode
that fails answers 500 (NaN logits, a bug) in the same shape, and a request the engine can no
longer take (shutting down) 503. Once a stream has started, a failure arrives as a last
`data: {"error": {...}}` event before `data: [DONE]`. A client that disconnects cancels its decode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from unmask.errors import UnmaskError
from unmask.serve.engine import Engine, EngineStopped, Event, QueueFull
from unmask.serve.protocol import (DEFAULT_MAX_BODY_BYTES, ApiError, ParsedRequest, chunk, completion_response,
                                   error_body, merge_stats, merge_usage, new_id, parse_chat, parse_completion,
                                   parse_json, sse)

log = logging.getLogger("unmask.serve")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    body = json.dumps(payload, default=str, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(exc: ApiError):
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return _json(exc.body(), exc.status, headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 past `limit` bytes: on its Content-Length before any of
    it is read, and on the bytes actually read (a chunked body declares no length)."""
    too_large = ApiError(f"the request body is larger than this server's limit of {limit} bytes; send a smaller "
                         "request (the server's operator sets the limit with unmask serve --max-body-bytes)",
                         status=413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    parts, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


class _Channel:
    """Events from the engine thread into this request's coroutine."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


def create_app(engine: Engine, model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The FastAPI app serving `engine`'s model under `model_name` (default: the model's name).

    Request bodies over `max_body_bytes` get a 413.
    """
    if max_body_bytes < 1:
        raise UnmaskError(f"max_body_bytes must be at least 1, got {max_body_bytes}", field="max_body_bytes")
    served = model_name or engine.model.name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="unmask", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}; the API is /v1/completions, /v1/chat/completions, "
                        "/v1/models and /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _json(error_body(message), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):  # not used by our routes; kept uniform
        return _json(error_body(f"invalid request: {exc.errors()[:1]}"), 400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # pragma: no cover - a bug, reported as JSON
        log.exception("unhandled error")
        return _json(error_body(f"internal error: {type(exc).__name__}", type_="server_error"), 500)

    @app.get("/health")
    async def health():
        state = engine.health()
        return _json({"status": "ok" if state["alive"] else "engine stopped", "model": served, "engine": state},
                     200 if state["alive"] else 503)

    @app.get("/v1/models")
    async def models():
        model = engine.model
        card = {"id": served, "object": "model", "created": created, "owned_by": "unmask",
                "max_model_len": model.max_length,
                "unmask": {"gen_length": model.defaults.gen_length, "block_length": model.defaults.block_length,
                           "strategy": engine.config.strategy, "max_batch_size": engine.config.max_batch_size}}
        return _json({"object": "list", "data": [card]})

    async def handle(request: Request, chat: bool):
        try:
            body = parse_json(await _read_body(request, max_body_bytes))
            parsed = parse_chat(body, served) if chat else parse_completion(body, served)
            jobs = await asyncio.to_thread(lambda: [engine.prepare(g) for g in parsed.generations])
            for index, job in enumerate(jobs):
                job.index = index
            channel = _Channel()
            try:
                engine.submit(jobs, channel.sink)
            except QueueFull as exc:
                raise ApiError(str(exc), status=429, type_="rate_limit_exceeded", code="queue_full") from None
            except EngineStopped as exc:
                raise ApiError(str(exc), status=503, type_="server_error") from None
        except ApiError as exc:
            return _error(exc)
        except UnmaskError as exc:
            return _error(ApiError(exc.message, exc.field))
        except ClientDisconnect:  # gone before the body arrived: nobody to answer
            return _json(error_body("the client disconnected"), 499)
        rid = new_id(chat)
        if parsed.stream:
            return StreamingResponse(_stream(rid, parsed, jobs, channel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, rid, parsed, jobs, channel)

    async def _collect(request: Request, rid: str, parsed: ParsedRequest, jobs, channel: _Channel):
        """Wait for every job's final event, cancelling them all if the client disconnects."""

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        finished: dict[int, Event] = {}
        try:
            while len(finished) < len(jobs):
                getter = asyncio.ensure_future(channel.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    for job in jobs:
                        job.cancel()
                    return _json(error_body("the client disconnected"), 499)
                event = getter.result()
                if event.kind == "error":
                    for job in jobs:
                        job.cancel()
                    kind = "server_error" if event.status >= 500 else "invalid_request_error"
                    return _json(error_body(event.message, event.param, kind), event.status)
                if event.kind in ("done", "cancelled"):
                    finished[event.index] = event
        except asyncio.CancelledError:
            for job in jobs:
                job.cancel()
            raise
        finally:
            watcher.cancel()
        return _json(completion_response(rid, served, parsed.chat, list(finished.values())))

    async def _stream(rid: str, parsed: ParsedRequest, jobs, channel: _Channel):
        """SSE: a chunk per committed block of text, a final chunk per choice, then [DONE].

        Starlette closes this generator when the client goes away; the `finally` cancels the decode.
        """
        chat, stamp = parsed.chat, int(time.time())
        finished: dict[int, Event] = {}
        failed = False
        try:
            if chat:
                for job in jobs:
                    yield sse(chunk(rid, served, True, job.index, text="", role=True, created=stamp))
            while len(finished) < len(jobs):
                event = await channel.get()
                if event.kind == "delta":
                    yield sse(chunk(rid, served, chat, event.index, text=event.text, created=stamp))
                elif event.kind == "done":
                    finished[event.index] = event
                    yield sse(chunk(rid, served, chat, event.index, finish_reason=event.finish_reason, created=stamp))
                elif event.kind == "cancelled":
                    finished[event.index] = event
                elif event.kind == "error":  # the status line is sent: the error is the last event
                    kind = "server_error" if event.status >= 500 else "invalid_request_error"
                    yield sse(error_body(event.message, event.param, kind))
                    failed = True
                    break
            if parsed.include_usage and finished and not failed:
                events = [e for e in finished.values() if e.kind == "done"]
                final = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": stamp, "model": served, "choices": [], "usage": merge_usage(events),
                         "unmask": merge_stats(events) if events else {}}
                yield sse(final)
            yield sse("[DONE]")
        finally:
            for job in jobs:
                job.cancel()  # harmless once a job has finished; stops it if it still runs

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
