"""The FastAPI application of ``diffrt serve``.

* ``POST /v1/generate`` (:class:`~diffrt.serve.schema.GenerateRequest`): one sample, batched with
  concurrent compatible requests; answers a PNG (``image/png``) or the raw sample
  (:class:`~diffrt.serve.schema.LatentsResponse`). Headers ``X-Diffrt-Batch-Size`` and
  ``X-Diffrt-Latency-Ms`` say how it ran. 4xx with a message for what cannot be served (unknown
  model, acceleration or solver, the wrong kind of condition, NaN, a body over the size limit),
  503 + ``Retry-After`` when the queue is full or a batch ran out of GPU memory.
* ``WS /v1/stream`` (:mod:`~diffrt.serve.websocket`): first a JSON :class:`~diffrt.serve.schema.StreamConfig`,
  then binary .npy frames [C, H, W] in; per frame one message out: the output frame (.npy, binary)
  or, while the stream batch fills, ``{"ready": false}``. A stream holds one of ``max_streams``
  slots until it ends (a full house: accepted, then closed with code 1013, "try again later");
  errors close with a code and a reason (1003, 1007, 1008, 1009, 1011), idle streams after
  ``stream_idle_timeout_s``.
* ``GET /healthz`` (:class:`~diffrt.serve.schema.Health`), ``GET /metrics`` (Prometheus text:
  ``diffrt_queue_depth``, ``diffrt_batch_size``, ``diffrt_request_seconds``,
  ``diffrt_requests_total{status}``, ``diffrt_streams_active``, ``diffrt_gpu_memory_bytes``).

Every HTTP answer carries ``X-Request-Id``; every error answer, diffrt's or Starlette's own (404 unknown
path, 405 wrong method, 400), has one JSON shape: ``{"detail": <message>, "request_id": <id>}``, a 422
adding ``"errors"`` (``[{"loc", "msg"}]``). The body limit is enforced while the body is read and an
unexpected error is a logged 500 with the request id (:mod:`~diffrt.serve.middleware`). A request
whose client disconnects before its batch runs is dropped from the queue (its batcher future is
cancelled), so abandoned requests do not delay the next ones.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher
from .engine import Engine, RequestError, Result, ServeConfig, Unavailable
from .middleware import BodyTooLarge, ServeMiddleware, error_body, request_id_of
from .schema import GenerateRequest, Health, LatentsResponse, describe_errors, error_summary
from .websocket import StreamServer

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # the client went away before its answer (nginx's code; nobody reads it, the metrics count it)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, engine: Engine, depth):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("diffrt_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(depth)
        self.batch_size = Histogram("diffrt_batch_size", "requests per model batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("diffrt_batch_seconds", "seconds per model batch", registry=self.registry)
        self.request_seconds = Histogram("diffrt_request_seconds", "seconds from request to response",
                                         registry=self.registry)
        self.requests = Counter("diffrt_requests", "requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.streams = Gauge("diffrt_streams_active", "open /v1/stream connections", registry=self.registry)
        self.gpu_memory = Gauge("diffrt_gpu_memory_bytes", "CUDA memory allocated (NaN on CPU)",
                                registry=self.registry)
        self.gpu_memory.set_function(engine.memory_bytes)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


# FastAPI's own words where they do not say what to change
_FRAMEWORK_DETAILS = {
    "There was an error parsing the body": "the body could not be parsed as a JSON object (malformed, or nested "
                                           "too deeply)",
}


def _error(request: Request, status: int, message: str, retry_after: float | None = None,
           headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    """An error answer: :func:`~diffrt.serve.middleware.error_body` with this request's id."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return JSONResponse(error_body(message, request_id_of(request.scope), **extra), status_code=status,
                        headers=headers or None)


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body is read: the next message is the disconnect)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.01)
    except Exception:  # noqa: BLE001 - the server cannot tell: wait for the result alone
        log.debug("serve: cannot watch request %s for a disconnect", request_id_of(request.scope), exc_info=True)
        await asyncio.Event().wait()


async def result_unless_disconnected(request: Request, future: concurrent.futures.Future) -> Result | None:
    """The batcher's result, or None when the client disconnects first: then (and when this coroutine is
    cancelled) the future is cancelled, so the batcher drops the request before it reaches a batch."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            future.cancel()  # a running batch is not stopped; a queued request is dropped
            result.cancel()
    return result.result() if result.done() and not result.cancelled() else None


def _answer(body: GenerateRequest, result: Result) -> Response:
    headers = {"X-Diffrt-Batch-Size": str(result.batch_size), "X-Diffrt-Latency-Ms": f"{result.latency_ms:.2f}"}
    if body.output == "png":
        return Response(result.png(), media_type="image/png", headers=headers)
    return JSONResponse(LatentsResponse(shape=list(result.sample.shape), npy_base64=result.npy_base64(),
                                        batch_size=result.batch_size, latency_ms=result.latency_ms).model_dump(),
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = describe_errors(error.errors())
        return _error(request, 422, error_summary(errors), errors=errors)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return _error(request, 413, error.detail, headers={"Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (404, 405, 400...) in the server's error shape, their headers kept."""
        detail = _FRAMEWORK_DETAILS.get(str(error.detail), str(error.detail))
        return _error(request, error.status_code, detail, headers=getattr(error, "headers", None))


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The application; its engine and batcher start with it and stop (draining the queue) with it.
    An unknown model in ``config.models`` raises ValueError here (naming the available ones)."""
    config = config or ServeConfig()
    engine = Engine(config)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state["batcher"].close()

    app = FastAPI(title="diffrt serve", version="1", lifespan=lifespan,
                  description="Diffusion sampling with dynamic batching and frame streams (diffrt).")
    metrics = Metrics(engine, lambda: state["batcher"].depth)
    state["batcher"] = Batcher(engine, config.max_batch, config.max_wait_ms, config.max_queue, config.retry_after_s,
                               on_batch=metrics.observe_batch)
    streams = StreamServer(engine, config, metrics)
    app.state.engine, app.state.metrics, app.state.batcher = engine, metrics, state["batcher"]
    app.state.stream_server = streams
    app.add_middleware(ServeMiddleware, max_body_bytes=config.max_body_bytes, metrics=metrics)
    _install_error_handlers(app)

    @app.post("/v1/generate", response_model=LatentsResponse,
              responses={200: {"content": {"image/png": {}}, "description": "a PNG, or the latents as JSON"},
                         400: {"description": "a request this server cannot serve as asked"},
                         404: {"description": "unknown model"}, 413: {"description": "body too large"},
                         500: {"description": "an unexpected error: the body and X-Request-Id name the logged request"},
                         503: {"description": "queue full or out of GPU memory: retry after Retry-After seconds"}})
    async def generate(body: GenerateRequest, request: Request):
        try:
            await asyncio.to_thread(engine.check, body)  # may load the model (first use)
            if await request.is_disconnected():
                return _client_gone(request)
            result = await result_unless_disconnected(request, state["batcher"].submit(body))
        except RequestError as error:
            return _error(request, error.status, str(error))
        except Unavailable as error:
            return _error(request, 503, str(error), error.retry_after_s)
        return _client_gone(request) if result is None else _answer(body, result)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", models=list(config.models), accelerations=list(config.accelerations),
                      device=str(engine.device), queue_depth=state["batcher"].depth,
                      max_batch=state["batcher"].max_batch, streams=streams.active)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/stream")
    async def stream(socket: WebSocket):
        await streams.handle(socket)

    return app


def _client_gone(request: Request) -> Response:
    log.info("serve: request %s: the client disconnected; dropped before its batch", request_id_of(request.scope))
    return Response(status_code=CLIENT_CLOSED)
