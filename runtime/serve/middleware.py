"""The ASGI middleware of ``diffrt serve``: request ids, the body limit, the catch-all 500, HTTP metrics.

:class:`ServeMiddleware` wraps the whole application (outside FastAPI's exception handling):

* every HTTP request gets a request id (the client's ``X-Request-Id`` when it is a short token,
  a fresh one otherwise), in ``request.state.request_id`` and in the response's ``X-Request-Id``;
  WebSocket connections get one in their state too;
* the body limit is enforced while the body is read: a declared ``Content-Length`` over the limit
  is answered 413 before anything is read, and a body without one (chunked transfer encoding) is
  counted as it arrives and refused (:class:`BodyTooLarge`, 413) as soon as it passes the limit, so
  the server never holds more than the limit and one chunk;
* an exception nothing else handled becomes a logged 500 carrying the request id (header and body);
* every error answer of the server has one JSON shape, :func:`error_body`: ``{"detail": <message>,
  "request_id": <id>}`` (a 422 adds ``"errors"``, the list of problems), whether diffrt or Starlette
  (404, 405, 400) wrote it;
* ``diffrt_request_seconds`` times each request and ``diffrt_requests_total{status}`` counts the
  answers under ``/v1/``.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class BodyTooLarge(HTTPException):
    """A request body passed ``max_body_bytes`` while it was read (raised from ``receive``: HTTP 413)."""

    def __init__(self, limit: int, received: int):
        super().__init__(413, f"the body passed the limit ({received} bytes read so far); at most {limit} bytes")


def new_request_id() -> str:
    """A fresh request id (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def request_id_of(scope: Scope) -> str:
    """The request id the middleware gave this connection (a fresh one outside the middleware)."""
    return scope.get("state", {}).get("request_id") or new_request_id()


def error_body(message: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error answer: ``{"detail": message, "request_id": id, **extra}`` (module docstring)."""
    return {"detail": message, "request_id": request_id, **extra}


def client_request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-Id`` when it is a short token (letters, digits, ``._:-``), else None."""
    for name, value in scope.get("headers", ()):
        if name.decode("latin-1").lower() == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            return text if _CLIENT_ID.fullmatch(text) else None
    return None


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.isdigit():
            return int(value)
    return None


class _Answer:
    """The response side of one HTTP exchange: adds the request id header, remembers the status."""

    def __init__(self, send: Send, request_id: str):
        self._send, self.request_id = send, request_id
        self.status: int | None = None

    @property
    def started(self) -> bool:
        return self.status is not None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER.encode()]
            message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), self.request_id.encode())]}
        await self._send(message)

    async def error(self, status: int, message: str, close: bool = False) -> None:
        """A JSON :func:`error_body` answer; ``close`` ends the connection."""
        body = json.dumps(error_body(message, self.request_id)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:  # the rest of the body is not read: do not keep the connection for another request
            headers.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


class ServeMiddleware:
    """Request ids, the body limit, the catch-all 500 and the HTTP metrics (module docstring)."""

    def __init__(self, app: Callable, max_body_bytes: int, metrics: Any = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = client_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        answer = _Answer(send, request_id)
        start = time.perf_counter()
        try:
            await self._exchange(scope, receive, answer)
        finally:
            self._observe(scope, answer, time.perf_counter() - start)

    async def _exchange(self, scope: Scope, receive: Receive, answer: _Answer) -> None:
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await answer.error(413, f"the body is {declared} bytes; at most {self.max_body_bytes}", close=True)
            return
        try:
            await self.app(scope, self._limited(receive), answer.send)
        except BodyTooLarge as error:  # only if no exception handler answered it
            if not answer.started:
                await answer.error(413, error.detail, close=True)
        except Exception:  # noqa: BLE001 - the catch-all: logged with its request id, a 500 for the client
            log.exception("serve: request %s (%s %s) failed", answer.request_id, scope.get("method"), scope.get("path"))
            if not answer.started:
                await answer.error(500, f"internal server error (request id {answer.request_id})")

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` counting body bytes: :class:`BodyTooLarge` once they pass the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes, received)
            return message

        return limited

    def _observe(self, scope: Scope, answer: _Answer, seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics.request_seconds.observe(seconds)
        if scope.get("path", "").startswith("/v1/"):
            self.metrics.requests.labels(str(answer.status or 500)).inc()
