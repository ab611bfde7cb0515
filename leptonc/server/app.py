"""The ASGI app: OpenAI's completions, chat completions and models endpoints, /health and /metrics.

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
the README's "Serving" section lists; no traceback ever reaches a client (an unexpected exception is a 500
with a plain message, and its traceback goes to the server's log). A streamed request whose client goes
away is cancelled in the engine, which frees its slot at once.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from leptonc.errors import InputError
from leptonc.runtime.batching import BatchingEngine, EngineStoppedError, Event, QueueFullError
from leptonc.server.metrics import ServerMetrics
from leptonc.server.models import ChatCompletionRequest, CompletionRequest
from leptonc.server.streaming import EventDispatcher, EventSink, EventStreamResponse, SseChunks, json_text, sse

log = logging.getLogger("leptonc.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # clients must send "Authorization: Bearer KEY" to /v1/*
    max_body_bytes: int = 1 << 20  # a request body beyond this is refused (413)
    grace_s: float = 30.0  # on shutdown, how long requests in flight may take to finish

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise InputError(f"max_body_bytes must be at least 1024, not {self.max_body_bytes}")
        if self.grace_s < 0:
            raise InputError(f"the grace period must be >= 0 seconds, not {self.grace_s}")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, QueueFullError):
        return ApiError(429, exc.message, "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, exc.message, "service_unavailable", code="shutting_down")
    if isinstance(exc, InputError):
        return ApiError(400, exc.message, param="prompt" if "prompt" in exc.message else None,
                        code="context_length_exceeded" if "limit" in exc.message or "at most" in exc.message else None)
    raise exc


def create_app(engine: BatchingEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # What loading made (the runtime, the tokenizer, the web stack: a few hundred thousand objects) lives as long
        # as the server: frozen, Python's full collections no longer walk it. Each one stops every thread; on the
        # H100 one of them stalled a 64-client run for about 0.3 s before this (BENCHMARKS.md, "Serving").
        gc.collect()
        gc.freeze()
        engine.start()
        yield
        # uvicorn has stopped accepting and waited for the responses in flight; now the engine drains.
        await asyncio.to_thread(engine.shutdown, settings.grace_s)

    app = FastAPI(title="leptonc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.dispatcher = engine, metrics, None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal server error (the server's log has the details)", "server_error").response()

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request, model):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; this server accepts at most "
                                f"{settings.max_body_bytes}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"the request body exceeds this server's limit of {settings.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise ApiError(400, f"{where}: {first.get('msg', 'invalid')} ({exc.error_count()} problem(s) in all)",
                           param=where) from None
        unsupported = parsed.unsupported()
        if unsupported:
            raise ApiError(400, unsupported, param=unsupported.split(":")[0], code="unsupported_parameter")
        if parsed.model != engine.model_name:
            raise ApiError(404, f"the model {parsed.model!r} does not exist; this server serves "
                                f"{engine.model_name!r}", param="model", code="model_not_found")
        return parsed

    def counted(endpoint: str):
        def wrap(handler):
            async def counted_handler(request: Request):
                try:
                    response = await handler(request)
                except ApiError as exc:
                    metrics.requests.labels(endpoint, str(exc.status)).inc()
                    raise
                except Exception:
                    metrics.requests.labels(endpoint, "500").inc()
                    raise
                metrics.requests.labels(endpoint, str(response.status_code)).inc()
                return response
            counted_handler.__name__ = handler.__name__
            return counted_handler
        return wrap

    # ---- generation -------------------------------------------------------------------------------

    def dispatcher() -> EventDispatcher:
        """The one dispatcher of the running loop (the engine's events reach the loop through it)."""
        loop = asyncio.get_running_loop()
        if app.state.dispatcher is None or app.state.dispatcher.loop is not loop:
            app.state.dispatcher = EventDispatcher(loop)
        return app.state.dispatcher

    def submit(prompt_ids: list[int], params) -> tuple:
        """Submit to the engine; (request, its event sink). Engine refusals become ApiErrors."""
        events, on_event = dispatcher().sink()
        try:
            request = engine.submit(prompt_ids, params, on_event=on_event)
        except (QueueFullError, EngineStoppedError, InputError) as exc:
            raise _engine_error(exc) from None
        return request, events

    async def events_of(request, events: EventSink, arrived: float):
        """The request's events as they come (those that piled up since the last one merged into one), timing
        them for /metrics: k tokens that come together after a gap g count as k inter-token gaps of g/k (the
        first token's time is the TTFT, and the others that come with it gaps of 0); cancels the request if
        abandoned."""
        last = None
        ttft, itl = metrics.ttft, metrics.itl
        try:
            while True:
                event = await events.take()
                now = time.perf_counter()
                count = len(event.token_ids)
                if count:
                    if last is None:
                        ttft.observe(now - arrived)
                        gap, count = 0.0, count - 1
                    else:
                        gap = (now - last) / count
                    itl.observe(gap, count)
                    last = now
                yield event
                if event.finish_reason is not None:
                    metrics.latency.observe(now - arrived)
                    return
        finally:
            if not request.finished:
                request.cancel()  # the client went away (or the stream was closed): free the slot now

    async def collect(http: Request, request, events, arrived: float) -> list[Event]:
        """All events of a non-streamed request; cancels it if the client disconnects first."""
        async def gather():
            return [event async for event in events_of(request, events, arrived)]

        async def disconnected():
            while not await http.is_disconnected():
                await asyncio.sleep(0.25)

        gathering, watching = asyncio.create_task(gather()), asyncio.create_task(disconnected())
        done, _ = await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if gathering not in done:
            gathering.cancel()
            request.cancel()
            raise ApiError(499, "the client closed the request", code="client_closed")
        return gathering.result()

    def usage(request) -> dict:
        prompt, completion = len(request.prompt_ids), len(request.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failed(events: list[Event]) -> None:
        if events and events[-1].finish_reason == "error":
            log.error("generation failed: %s", events[-1].error)
            raise ApiError(500, f"generation failed: {events[-1].error}", "server_error")

    def failure(event: Event) -> bytes:
        log.error("generation failed: %s", event.error)
        return sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error", "param": None,
                              "code": None}})

    def max_tokens_of(body, prompt_ids: list[int], default: int | None) -> int:
        chosen = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if chosen is None:
            chosen = default if default is not None else engine.max_sequence - len(prompt_ids)
        return chosen

    def sampling(body, prompt_ids, default):
        try:
            return body.sampling(max_tokens_of(body, prompt_ids, default))
        except InputError as exc:
            raise ApiError(400, exc.message, param="max_tokens" if "max_tokens" in exc.message else None) from None

    # ---- endpoints --------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if engine.ready:
            return {"status": "ok", "model": engine.model_name}
        reason = "failed: " + engine.failure if engine.failure else "not ready (loading or shutting down)"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @counted("models")
    async def models(http: Request):
        check_key(http)
        return JSONResponse({"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": 0, "owned_by": "leptonc",
            "max_model_len": engine.max_sequence, "vocab_size": engine.slots.vocab_size}]})

    @app.post("/v1/completions")
    @counted("completions")
    async def completions(http: Request):
        arrived = time.perf_counter()
        check_key(http)
        body: CompletionRequest = await read_json(http, CompletionRequest)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str) \
            else body.prompt
        prompt_ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request, events = submit(prompt_ids, sampling(body, prompt_ids, DEFAULT_MAX_TOKENS))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": engine.model_name}
        if not body.stream:
            result = await collect(http, request, events, arrived)
            failed(result)
            return JSONResponse({**head, "choices": [{
                "index": 0, "text": "".join(e.text for e in result), "logprobs": None,
                "finish_reason": OPENAI_FINISH[request.finish_reason], "token_ids": list(request.token_ids)}],
                "usage": usage(request)})

        chunks = SseChunks(head, '"text": ')

        async def stream():
            async for event in events_of(request, events, arrived):
                if event.finish_reason == "error":
                    if event.token_ids or event.text:
                        yield chunks.chunk(json_text(event.text), None, event.token_ids)
                    yield failure(event)
                    return
                finish = OPENAI_FINISH[event.finish_reason] if event.finish_reason else None
                yield chunks.chunk(json_text(event.text), finish, event.token_ids)
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage(request)})
            yield b"data: [DONE]\n\n"

        return EventStreamResponse(stream(), lambda: request.finished or request.cancel())

    @app.post("/v1/chat/completions")
    @counted("chat_completions")
    async def chat_completions(http: Request):
        arrived = time.perf_counter()
        check_key(http)
        body: ChatCompletionRequest = await read_json(http, ChatCompletionRequest)
        try:
            prompt_ids = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except InputError as exc:
            raise ApiError(400, exc.message, param="messages") from None
        request, events = submit(prompt_ids, sampling(body, prompt_ids, None))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": engine.model_name}
        if not body.stream:
            result = await collect(http, request, events, arrived)
            failed(result)
            return JSONResponse({**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(e.text for e in result)},
                "logprobs": None, "finish_reason": OPENAI_FINISH[request.finish_reason],
                "token_ids": list(request.token_ids)}], "usage": usage(request)})

        chunks = SseChunks({**head, "object": "chat.completion.chunk"}, '"delta": ')

        async def stream():
            yield chunks.chunk('{"role": "assistant", "content": ""}', None, ())
            async for event in events_of(request, events, arrived):
                if event.text or event.token_ids:
                    yield chunks.chunk(f'{{"content": {json_text(event.text)}}}', None, event.token_ids)
                if event.finish_reason == "error":
                    yield failure(event)
                    return
                if event.finish_reason is not None:
                    yield chunks.chunk("{}", OPENAI_FINISH[event.finish_reason], ())
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(request)})
            yield b"data: [DONE]\n\n"

        return EventStreamResponse(stream(), lambda: request.finished or request.cancel())

    return app
