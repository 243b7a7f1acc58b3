"""``WS /v1/stream`` of ``diffrt serve``: slots, the config handshake, frames, and how a stream ends.

A connection is always accepted, then:

* a full house (all ``max_streams`` slots held) closes it with **1013** (try again later);
* the first message must be a JSON :class:`~diffrt.serve.schema.StreamConfig` (text): binary there
  closes with **1003** (unsupported data), text that is not a valid config with **1007** (invalid
  payload), a config this server cannot serve (unknown model, a latent model, ``t_index_list`` out
  of range) with **1008** (policy);
* then binary .npy frames [C, H, W]: text there closes with 1003, bytes that are not a float .npy
  with 1007, a message over ``max_body_bytes`` with **1009** (too big); a frame of the wrong shape
  or holding NaN gets ``{"error": ...}`` and the stream goes on;
* each tick answers with the finished frame's image (binary .npy), ``{"ready": false}`` while the
  stages fill, or, for a frame that failed in the stream (its values overflowed, its tick raised),
  ``{"error": ..., "frame": <frame id>}`` in its slot; the stream goes on;
* a tick that fails because the model itself fails closes with **1011** and a reason saying why;
* a client that sends nothing for ``stream_idle_timeout_s`` (no config, or no next frame) is
  closed with 1008, so an idle connection does not hold a slot;
* an unexpected error closes with **1011** (internal error) and a reason carrying the request id
  (logged with its traceback).

Every close says why in its reason; before a 1003 / 1007 / 1008 / 1009, and a 1011 for a model failure,
the client also gets ``{"error": ..., "code": ...}`` as a last message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from .engine import Engine, RequestError, ServeConfig, StreamModelError, decode_npy, encode_npy
from .middleware import request_id_of
from .schema import StreamConfig, describe_errors, error_summary

log = logging.getLogger(__name__)

UNSUPPORTED_DATA, INVALID_PAYLOAD, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN = 1003, 1007, 1008, 1009, 1011, 1013
MAX_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 of them the code


class StreamClose(Exception):
    """End the stream with a WebSocket close ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame carries (123 bytes of UTF-8)."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[:MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


class StreamServer:
    """The ``/v1/stream`` handler: its slots and its sessions (module docstring)."""

    def __init__(self, engine: Engine, config: ServeConfig, metrics: Any = None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._slots = threading.BoundedSemaphore(config.max_streams) if config.max_streams else None
        self.active = 0

    async def handle(self, socket: WebSocket) -> None:
        """Serve one connection until it ends; a slot is held from the config to the end."""
        await socket.accept()
        if self._slots is None or not self._slots.acquire(blocking=False):
            await self._close(socket, TRY_AGAIN, f"all {self.config.max_streams} stream slots are busy; try again later")
            return
        self._opened(+1)
        try:
            await self._session(socket)
        except WebSocketDisconnect:
            log.info("serve: a stream client disconnected; its slot is free")
        except StreamClose as close:
            await self._refuse(socket, close)
        except Exception:  # noqa: BLE001 - any other failure: 1011 with the request id, logged
            request_id = request_id_of(socket.scope)
            log.exception("serve: stream %s failed", request_id)
            await self._close(socket, INTERNAL, f"internal error (request id {request_id})")
        finally:
            self._opened(-1)
            self._slots.release()

    def _opened(self, change: int) -> None:
        self.active += change
        if self.metrics is not None:
            self.metrics.streams.inc(change)

    async def _session(self, socket: WebSocket) -> None:
        config = await self._receive_config(socket)
        try:
            pipe = await asyncio.to_thread(self.engine.stream_pipeline, config)
        except RequestError as error:
            raise StreamClose(POLICY, str(error)) from error
        await socket.send_json({"ready": False, "accepted": True})
        while True:
            data = await self._receive(socket, "bytes")
            try:
                frame = decode_npy(data)
            except RequestError as error:
                raise StreamClose(INVALID_PAYLOAD, str(error)) from error
            try:
                result = await asyncio.to_thread(self.engine.stream_tick, pipe, frame)
            except RequestError as error:  # the wrong shape, NaN: this frame is refused, the stream goes on
                await socket.send_json({"error": str(error)})
                continue
            except StreamModelError as error:
                raise self._model_failed(socket, error) from error
            await self._send_result(socket, result)

    @staticmethod
    async def _send_result(socket: WebSocket, result: Any) -> None:
        """A tick's result: the image (binary .npy), a failed frame's ``{"error", "frame"}``, or not ready yet."""
        if result.error is not None:
            await socket.send_json({"error": result.error, "frame": result.frame_id})
        elif result.ready:
            await socket.send_bytes(encode_npy(result.image))
        else:
            await socket.send_json({"ready": False})

    @staticmethod
    def _model_failed(socket: WebSocket, error: StreamModelError) -> StreamClose:
        """The model fails on its own: log it with its traceback and end the stream with 1011 and why."""
        request_id = request_id_of(socket.scope)
        log.error("serve: stream %s: the model failed (%s); closing with %d", request_id, error, INTERNAL,
                  exc_info=error)
        return StreamClose(INTERNAL, f"the model failed (request id {request_id}): {error}")

    async def _receive_config(self, socket: WebSocket) -> StreamConfig:
        text = await self._receive(socket, "text")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise StreamClose(INVALID_PAYLOAD, f"the config is not JSON: {error}") from error
        if not isinstance(payload, dict):
            raise StreamClose(INVALID_PAYLOAD, "the config must be a JSON object")
        try:
            return StreamConfig.model_validate(payload)
        except ValidationError as error:
            raise StreamClose(INVALID_PAYLOAD, error_summary(describe_errors(error.errors()), "config")) from error

    async def _receive(self, socket: WebSocket, kind: str) -> Any:
        """The next message's text or bytes (``kind``); StreamClose for the wrong kind, a big one, or none in time."""
        timeout = self.config.stream_idle_timeout_s
        try:
            message = await asyncio.wait_for(socket.receive(), timeout)
        except asyncio.TimeoutError:
            wanted = "a config" if kind == "text" else "a frame"
            raise StreamClose(POLICY, f"idle: no message for {timeout:g} s (expected {wanted})") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        value = message.get(kind)
        if value is None:
            expected = "a JSON config (text)" if kind == "text" else "binary .npy frames"
            raise StreamClose(UNSUPPORTED_DATA, f"expected {expected}, got a {'binary' if kind == 'text' else 'text'} "
                                                "message")
        size = len(value.encode() if isinstance(value, str) else value)
        if size > self.config.max_body_bytes:
            raise StreamClose(TOO_BIG, f"a message of {size} bytes; at most {self.config.max_body_bytes}")
        return value

    async def _refuse(self, socket: WebSocket, close: StreamClose) -> None:
        log.info("serve: stream %s closed with %d: %s", request_id_of(socket.scope), close.code, close.reason)
        try:
            await socket.send_json({"error": close.reason, "code": close.code})
        except (RuntimeError, WebSocketDisconnect, OSError):
            return  # the client is gone already
        await self._close(socket, close.code, close.reason)

    @staticmethod
    async def _close(socket: WebSocket, code: int, reason: str) -> None:
        try:
            await socket.close(code=code, reason=close_reason(reason))
        except (RuntimeError, WebSocketDisconnect, OSError):
            log.debug("serve: the stream was closed already")
