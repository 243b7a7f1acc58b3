"""diffrt.serve: an embeddable server (FastAPI + uvicorn) with dynamic batching and frame streams, and a
Ray Serve deployment for scale-out (:mod:`diffrt.serve.ray`).

    from diffrt.serve import ServeConfig, create_app
    app = create_app(ServeConfig(models=("digits-dit",), max_batch=8))   # uvicorn.run(app)

or ``diffrt serve --models digits-dit``. The pieces: :mod:`~diffrt.serve.schema` (requests),
:mod:`~diffrt.serve.engine` (models, samplers, the device lock), :mod:`~diffrt.serve.batcher`
(dynamic batching, back-pressure, out-of-memory recovery, requests of disconnected clients dropped),
:mod:`~diffrt.serve.app` (routes, metrics), :mod:`~diffrt.serve.middleware` (request ids, the body
limit while reading, the catch-all 500), :mod:`~diffrt.serve.websocket` (streams: slots, close
codes, idle timeout), :mod:`~diffrt.serve.checks` (unknown models at startup, plans a model cannot run). fastapi, uvicorn, prometheus-client and pillow come with the ``serve`` extra,
ray with the ``ray`` extra; nothing here is imported by ``diffrt.runtime``.
"""
from .engine import Engine, RequestError, ServeConfig, Unavailable


def create_app(config: ServeConfig | None = None):
    """The FastAPI application (:mod:`diffrt.serve.app`)."""
    from .app import create_app as _create  # noqa: PLC0415 - fastapi loads here, not at import

    return _create(config)


__all__ = ["Engine", "RequestError", "ServeConfig", "Unavailable", "create_app"]
