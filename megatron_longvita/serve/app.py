"""The HTTP side (rank 0): FastAPI routes, authentication, body limits, SSE streaming, metrics.

Routes: ``POST /v1/chat/completions`` (OpenAI chat, streaming with ``data: [DONE]``),
``GET /v1/models``, ``PUT /api`` (the reference server's shape, for its evaluation client),
``GET /health``, ``GET /metrics`` (Prometheus text). Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, except on ``/api``, whose client reads
``{"message": ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_longvita.serve.prompts import PromptBuilder
from megatron_longvita.serve.protocol import ChatRequest, RequestError, parse_chat_request, parse_reference_request
from megatron_longvita.serve.scheduler import Event, Job, Scheduler

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "longvita_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.errors = Counter(
            "longvita_request_errors", "Requests answered with a 4xx/5xx", ["endpoint", "status"], registry=registry
        )
        self.cancelled = Counter(
            "longvita_requests_cancelled", "Generations cancelled (client gone, timeout)", registry=registry
        )
        self.prompt_tokens = Counter("longvita_prompt_tokens", "Prompt tokens (media included)", registry=registry)
        self.generated_tokens = Counter("longvita_generation_tokens", "Generated tokens", registry=registry)
        self.decode_steps = Counter(
            "longvita_decode_steps", "Engine steps (one new token per running row)", registry=registry
        )
        self.queue_depth = Gauge("longvita_queue_depth", "Requests waiting for a batch", registry=registry)
        self.queue_depth.set_function(lambda: len(scheduler))
        self.running = Gauge("longvita_running_requests", "Requests in the engine or waiting", registry=registry)
        self.latency = Histogram(
            "longvita_request_latency_seconds",
            "Request latency, end to end",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "longvita_time_to_first_token_seconds",
            "Time to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "longvita_batch_size", "Requests per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()


@dataclass
class ServerOptions:
    served_model_name: str = "long-vita"
    api_key: Optional[str] = None
    allowed_media_root: Optional[str] = None
    max_request_bytes: int = 64 * 2**20
    request_timeout_s: float = 600.0
    max_model_len: int = 0


def _openai_error(error: RequestError) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}},
        status_code=error.status,
    )


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes (--max-request-bytes)"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-request-bytes)")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from None


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job when the response ends early (client gone)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def build_app(
    options: ServerOptions,
    scheduler: Scheduler,
    builder: PromptBuilder,
    metrics: Metrics,
    engine_alive: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(title="megatron-longvita", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = builder.tokenizer
    eos_id = tokenizer.ids["<|im_end|>"]

    def authorise(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise RequestError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="authentication_error"
            )

    async def submit(chat: ChatRequest) -> Job:
        prompt, max_tokens = await run_in_threadpool(builder.build, chat)
        job = Job(
            prompt,
            max_tokens,
            chat.sampling,
            chat.stop,
            chat.ignore_eos,
            tokenizer.decode,
            eos_id,
            asyncio.get_running_loop(),
        )
        try:
            scheduler.submit(job)
        except RuntimeError as error:
            raise RequestError(503, str(error), kind="server_error") from None
        metrics.running.inc()
        return job

    def settle(job: Job, started: float) -> None:
        """Account a job once, whatever way it ended."""
        if job.settled:
            return
        job.settled = True
        metrics.running.dec()
        if job.finish_reason is None:
            job.cancelled = True
            metrics.cancelled.inc()
        metrics.prompt_tokens.inc(len(job.prompt.tokens))
        metrics.generated_tokens.inc(len(job.ids))
        metrics.latency.observe(time.monotonic() - started)
        if job.first_token_s is not None:
            metrics.first_token.observe(job.first_token_s)

    async def next_event(job: Job, deadline: float) -> Event:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(job.events.get(), remaining)

    async def collect(job: Job, request: Request, deadline: float) -> tuple[str, str]:
        """(text, finish reason) of a non-streamed job; cancels it if the client goes away."""
        text = []
        while True:
            try:
                event = await next_event(job, min(deadline, time.monotonic() + 0.5))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise RequestError(
                        504,
                        f"generation did not finish within {options.request_timeout_s:g} s (--request-timeout)",
                        kind="timeout_error",
                    ) from None
                if await request.is_disconnected():
                    raise RequestError(499, "client disconnected") from None
                continue
            if event.kind == "text":
                text.append(event.text)
            elif event.kind == "done":
                return "".join(text), event.finish_reason
            else:
                raise RequestError(event.status, event.text, kind="server_error")

    def usage(job: Job) -> dict[str, int]:
        prompt_tokens, completion_tokens = len(job.prompt.tokens), len(job.ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def stream(job: Job, chat: ChatRequest, deadline: float) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish_reason: Optional[str] = None) -> str:
            body = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": options.served_model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            if chat.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                event = await next_event(job, deadline)
            except TimeoutError:
                job.cancelled = True
                event = Event("error", f"generation did not finish within {options.request_timeout_s:g} s", status=504)
            if event.kind == "text":
                yield chunk({"content": event.text})
                continue
            if event.kind == "done":
                yield chunk({}, event.finish_reason)
                if chat.include_usage:
                    final = {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": options.served_model_name,
                        "choices": [],
                        "usage": usage(job),
                    }
                    yield f"data: {json.dumps(final)}\n\n"
            else:
                error = {"message": event.text, "type": "server_error", "param": None, "code": event.status}
                yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
            return

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _openai_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _openai_error(RequestError(error.status_code, str(error.detail)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started, endpoint = time.monotonic(), "/v1/chat/completions"
        job = None
        try:
            authorise(request)
            with scheduler.preparing():
                chat = parse_chat_request(
                    await _read_json(request, options.max_request_bytes),
                    options.served_model_name,
                    options.allowed_media_root,
                )
                job = await submit(chat)
            deadline = started + options.request_timeout_s
            if chat.stream:
                metrics.count(endpoint, 200)
                return _JobStream(stream(job, chat, deadline), lambda: settle(job, started))
            text, finish_reason = await collect(job, request, deadline)
        except RequestError as error:
            metrics.count(endpoint, error.status)
            if job is not None:
                settle(job, started)
            return _openai_error(error)
        settle(job, started)
        metrics.count(endpoint, 200)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": options.served_model_name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            ],
            "usage": usage(job),
        }

    @app.put("/api")
    async def reference_api(request: Request):
        """The reference server's interface: {"text": [answer per prompt]}, errors {"message": ...}."""
        started, endpoint = time.monotonic(), "/api"
        jobs: list[Job] = []
        try:
            authorise(request)
            with scheduler.preparing():
                chats = parse_reference_request(
                    await _read_json(request, options.max_request_bytes), options.allowed_media_root
                )
                for chat in chats:
                    jobs.append(await submit(chat))
            deadline = started + options.request_timeout_s
            texts = [(await collect(job, request, deadline))[0] for job in jobs]
        except RequestError as error:
            metrics.count(endpoint, error.status)
            for job in jobs:
                settle(job, started)
            return JSONResponse({"message": error.message}, status_code=error.status)
        for job in jobs:
            settle(job, started)
        metrics.count(endpoint, 200)
        return {"text": texts}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": options.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "megatron-longvita",
                    "max_model_len": options.max_model_len,
                }
            ],
        }

    @app.get("/health")
    async def health():
        if not engine_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
