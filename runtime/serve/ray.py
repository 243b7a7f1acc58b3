"""Scale-out on Ray Serve: the same request schema and engine behind a Ray Serve deployment.

    from ray import serve
    from diffrt.serve.ray import app
    serve.run(app({"models": ["digits-dit"]}, num_replicas=2), route_prefix="/")

or with a config file (``serve run runtime/serve/ray-cluster.yaml``: replicas per GPU, autoscaling,
a multi-node cluster). Each replica holds one :class:`~diffrt.serve.engine.Engine` (its models on
its GPU); Ray Serve's ``@serve.batch`` gathers concurrent requests on a replica and the engine
splits them into compatible batches (:meth:`Engine.run_mixed`); Ray Serve's router spreads requests
over replicas and its autoscaler adds replicas with the queue. ``POST /`` takes the JSON of
:class:`~diffrt.serve.schema.GenerateRequest` and answers JSON: the sample as base64 PNG or .npy,
the batch size and the replica that ran it. Streams stay on the FastAPI server (one GPU per stream,
behind a session-affine router: README, "Beyond one GPU").
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .engine import Engine, RequestError, ServeConfig
from .middleware import client_request_id, error_body, new_request_id
from .schema import GenerateRequest, describe_errors, error_summary

log = logging.getLogger(__name__)

MAX_BATCH, BATCH_WAIT_S = 8, 0.01


@serve.deployment(max_ongoing_requests=64)
class DiffrtDeployment:
    """One replica: an Engine; requests batched by Ray Serve, then grouped by the engine."""

    def __init__(self, config: dict[str, Any] | None = None):
        options = dict(config or {})
        if "models" in options:
            options["models"] = tuple(options["models"])
        self.engine = Engine(ServeConfig(**options))
        context = serve.get_replica_context()
        replica = getattr(context, "replica_id", None)
        self.replica = str(getattr(replica, "unique_id", None) or replica or getattr(context, "replica_tag", "?"))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate(self, requests: list[GenerateRequest]) -> list[Any]:
        return await asyncio.to_thread(self.engine.run_mixed, requests)

    async def __call__(self, http: Request) -> JSONResponse:
        from pydantic import ValidationError  # noqa: PLC0415

        request_id = client_request_id(http.scope) or new_request_id()

        def error(status: int, message: str, **extra: Any) -> JSONResponse:
            return JSONResponse(error_body(message, request_id, **extra), status_code=status,
                                headers={"X-Request-Id": request_id})

        try:
            payload = await http.json()
        except ValueError as malformed:  # not JSON, or not UTF-8
            return error(400, f"the body is not valid JSON: {malformed}")
        try:
            request = GenerateRequest.model_validate(payload)
            self.engine.check(request)
        except ValidationError as invalid:
            errors = describe_errors(invalid.errors())
            return error(422, error_summary(errors), errors=errors)
        except RequestError as refused:
            return error(refused.status, str(refused))
        result = await self._generate(request)
        if isinstance(result, Exception):
            log.error("ray serve: request %s failed", request_id, exc_info=result)
            return error(500, f"internal server error (request id {request_id}): {type(result).__name__}")
        body = {"batch_size": result.batch_size, "latency_ms": result.latency_ms, "replica": self.replica,
                "shape": list(result.sample.shape)}
        if request.output == "png":
            import base64  # noqa: PLC0415

            body["png_base64"] = base64.b64encode(result.png()).decode()
        else:
            body["npy_base64"] = result.npy_base64()
        return JSONResponse(body)


def app(config: dict[str, Any] | None = None, num_replicas: int | str = 1, num_gpus: float | None = None,
        num_cpus: float | None = None):
    """The Ray Serve application (``serve.run(app(...))``; a config file's ``import_path`` names
    ``diffrt.serve.ray:app_from_args``). ``num_gpus`` per replica (default: 1 where Ray sees GPUs)."""
    actor: dict[str, Any] = {}
    if num_gpus is not None:
        actor["num_gpus"] = num_gpus
    if num_cpus is not None:
        actor["num_cpus"] = num_cpus
    return DiffrtDeployment.options(num_replicas=num_replicas, ray_actor_options=actor).bind(config)


def app_from_args(args: dict[str, Any]):
    """For ``serve run`` / a Serve config file: ``args`` are the ``config`` dict of :class:`ServeConfig`."""
    return DiffrtDeployment.bind(args)
