"""The FastAPI application of ``diffrt serve``.

* ``POST /v1/generate`` (:class:`~diffrt.serve.schema.GenerateRequest`): one sample, batched with
  concurrent compatible requests; answers a PNG (``image/png``) or the raw sample
  (:class:`~diffrt.serve.schema.LatentsResponse`). Headers ``X-Diffrt-Batch-Size`` and
  ``X-Diffrt-Latency-Ms`` say how it ran. 4xx with a message for what cannot be served (unknown
  model, acceleration or solver, the wrong kind of condition, NaN, a body over the size limit),
  503 + ``Retry-After`` when the queue is full or a batch ran out of GPU memory.
* ``WS /v1/stream``: first a JSON :class:`~diffrt.serve.schema.StreamConfig`, then binary .npy
  frames [C, H, W] in; per frame one message out: the output frame (.npy, binary) or, while the
  stream batch fills, ``{"ready": false}``. A stream holds one of ``max_streams`` slots until the
  client disconnects (busy: closed with code 1013, "try again later").
* ``GET /healthz`` (:class:`~diffrt.serve.schema.Health`), ``GET /metrics`` (Prometheus text:
  ``diffrt_queue_depth``, ``diffrt_batch_size``, ``diffrt_request_seconds``,
  ``diffrt_requests_total{status}``, ``diffrt_streams_active``, ``diffrt_gpu_memory_bytes``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from .batcher import Batcher
from .engine import Engine, RequestError, ServeConfig, Unavailable, decode_npy, encode_npy
from .schema import GenerateRequest, Health, LatentsResponse, StreamConfig

log = logging.getLogger(__name__)


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


def _error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The application; its engine and batcher start with it and stop (draining the queue) with it."""
    config = config or ServeConfig()
    engine = Engine(config)
    slots = threading.BoundedSemaphore(config.max_streams) if config.max_streams else None
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
    app.state.engine, app.state.metrics, app.state.batcher = engine, metrics, state["batcher"]
    app.state.streams = 0

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # the messages only: the offending input is not echoed (it may hold NaN, which JSON cannot carry)
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        return JSONResponse({"error": f"invalid request: {message}", "detail": details}, status_code=422)

    @app.middleware("http")
    async def limit_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            response = _error(413, f"the body is {length} bytes; at most {config.max_body_bytes}")
        else:
            with metrics.request_seconds.time():
                response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.post("/v1/generate", response_model=LatentsResponse,
              responses={200: {"content": {"image/png": {}}, "description": "a PNG, or the latents as JSON"},
                         400: {"description": "a request this server cannot serve as asked"},
                         404: {"description": "unknown model"}, 413: {"description": "body too large"},
                         503: {"description": "queue full or out of GPU memory: retry after Retry-After seconds"}})
    async def generate(body: GenerateRequest):
        try:
            await asyncio.to_thread(engine.check, body)  # may load the model (first use)
            future = state["batcher"].submit(body)
            result = await asyncio.wrap_future(future)
        except RequestError as error:
            return _error(error.status, str(error))
        except Unavailable as error:
            return _error(503, str(error), error.retry_after_s)
        except Exception as error:  # noqa: BLE001 - a failed batch: a 500 with its message, the server goes on
            log.exception("serve: generate failed")
            return _error(500, f"{type(error).__name__}: {error}")
        headers = {"X-Diffrt-Batch-Size": str(result.batch_size), "X-Diffrt-Latency-Ms": f"{result.latency_ms:.2f}"}
        if body.output == "png":
            return Response(result.png(), media_type="image/png", headers=headers)
        return JSONResponse(LatentsResponse(shape=list(result.sample.shape), npy_base64=result.npy_base64(),
                                            batch_size=result.batch_size, latency_ms=result.latency_ms).model_dump(),
                            headers=headers)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", models=list(config.models), accelerations=list(config.accelerations),
                      device=str(engine.device), queue_depth=state["batcher"].depth,
                      max_batch=state["batcher"].max_batch, streams=app.state.streams)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/stream")
    async def stream(socket: WebSocket):
        if slots is None or not slots.acquire(blocking=False):
            await socket.close(code=1013, reason=f"all {config.max_streams} stream slots are busy; try again later")
            return
        app.state.streams += 1
        metrics.streams.inc()
        try:
            await socket.accept()
            try:
                pipe = await asyncio.to_thread(engine.stream_pipeline, StreamConfig(**await socket.receive_json()))
            except (ValidationError, RequestError, TypeError, ValueError) as error:
                await socket.send_json({"error": str(error)})
                await socket.close(code=1008)
                return
            await socket.send_json({"ready": False, "accepted": True})
            while True:
                data = await socket.receive_bytes()
                try:
                    result = await asyncio.to_thread(engine.stream_tick, pipe, decode_npy(data))
                except RequestError as error:
                    await socket.send_json({"error": str(error)})
                    continue
                if result.ready:
                    await socket.send_bytes(encode_npy(result.image))
                else:
                    await socket.send_json({"ready": False})
        except WebSocketDisconnect:
            log.info("serve: a stream client disconnected; its slot is free")
        finally:
            app.state.streams -= 1
            metrics.streams.dec()
            slots.release()

    return app
