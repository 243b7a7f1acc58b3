"""diffrt serve's WebSocket stream reports faults: a frame that fails inside the stream (its values overflow)
gets ``{"error": ..., "frame": id}`` in its slot and the stream goes on; a frame the pipeline refuses gets
``{"error": ...}``; a model that fails on its own closes the stream with 1011 and a reason (logged with its
traceback), and the server still serves the next stream. FastAPI's TestClient; every receive is bounded in
time; nothing is timed for speed."""
import json
import logging
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402

from diffrt.runtime import models  # noqa: E402
from diffrt.runtime.stream import StreamPipeline  # noqa: E402
from diffrt.serve import ServeConfig, create_app  # noqa: E402
from diffrt.serve.engine import decode_npy, encode_npy  # noqa: E402

CONFIG = {"model": "digits-dit", "class_label": 4, "t_index_list": [20, 40], "seed": 3}
WAIT = 60  # seconds a message may take before the test calls it a hang


def _client(**options) -> TestClient:
    return TestClient(create_app(ServeConfig(**{"models": ("digits-dit",), "max_wait_ms": 5.0, **options})))


def _receive(session, seconds: float = WAIT) -> dict:
    """The next raw message, waited for in a thread joined with a timeout (a hang fails the test)."""
    box = []
    thread = threading.Thread(target=lambda: box.append(session.receive()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"no message within {seconds} s"
    return box[0]


def _open(client: TestClient):
    session = client.websocket_connect("/v1/stream")
    socket = session.__enter__()
    socket.send_json(CONFIG)
    assert json.loads(_receive(socket)["text"]) == {"ready": False, "accepted": True}
    return session, socket


def _frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 16, 16, generator=gen) * 2 - 1 for _ in range(n)]


def _reply(socket, frame: torch.Tensor):
    """Send a frame; its tick's answer: a tensor (an image) or the JSON message."""
    socket.send_bytes(encode_npy(frame))
    message = _receive(socket)
    if message.get("bytes") is not None:
        return decode_npy(message["bytes"])
    return json.loads(message["text"])


def _offline(frames: list[torch.Tensor]) -> list:
    pipe = StreamPipeline(models.load("digits-dit"), t_index_list=(20, 40), cond=torch.tensor(4), seed=3)
    return [pipe.tick(frame) for frame in frames]


class FailingDenoiser:
    """The stream's denoiser, failing every call after the first ``good_calls`` (a device lost mid-stream)."""

    def __init__(self, den, good_calls: int):
        self.den, self.good_calls = den, good_calls

    def __getattr__(self, name):
        return getattr(self.den, name)

    def __call__(self, *args, **kwargs):
        if self.good_calls <= 0:
            raise RuntimeError("CUDA error: device lost")
        self.good_calls -= 1
        return self.den(*args, **kwargs)


def _with_failing_model(engine, good_calls: int):
    """Make the engine's next stream pipelines fail after ``good_calls`` model calls; returns the original."""
    real = engine.stream_pipeline

    def failing(config):
        pipe = real(config)
        pipe.den = FailingDenoiser(pipe.den, good_calls)
        return pipe

    engine.stream_pipeline = failing
    return real


def _still_streams(client: TestClient) -> None:
    """A fresh stream after a fault: its first frames come out as the pipeline computes them offline."""
    frames = _frames(3, seed=9)
    session, socket = _open(client)
    try:
        replies = [_reply(socket, frame) for frame in frames]
    finally:
        session.__exit__(None, None, None)
    assert replies[0] == {"ready": False}
    for ours, theirs in zip(replies[1:], _offline(frames)[1:]):
        torch.testing.assert_close(ours, theirs.image.float(), rtol=1e-4, atol=1e-4)


def test_a_failed_frame_gets_an_error_with_its_id_and_the_stream_goes_on():
    frames = _frames(4)
    frames[1] = torch.full((1, 16, 16), 1e30)  # finite, so it enters; the model's output overflows
    with _client() as client:
        session, socket = _open(client)
        try:
            replies = [_reply(socket, frame) for frame in frames]
        finally:
            session.__exit__(None, None, None)
        _still_streams(client)
    offline = _offline(frames)
    assert replies[0] == {"ready": False}
    torch.testing.assert_close(replies[1], offline[1].image.float(), rtol=1e-4, atol=1e-4)  # frame 0
    assert replies[2]["frame"] == 1 and "non-finite" in replies[2]["error"] and set(replies[2]) == {"error", "frame"}
    assert offline[2].error == replies[2]["error"]
    torch.testing.assert_close(replies[3], offline[3].image.float(), rtol=1e-4, atol=1e-4)  # frame 2


def test_a_frame_the_pipeline_refuses_gets_an_error_and_the_stream_goes_on():
    frames = _frames(3, seed=1)
    with _client() as client:
        session, socket = _open(client)
        try:
            first = _reply(socket, frames[0])
            refused = _reply(socket, torch.rand(1, 1, 16, 16))  # a batched frame: not [C, H, W]
            rest = [_reply(socket, frame) for frame in frames[1:]]
        finally:
            session.__exit__(None, None, None)
    assert first == {"ready": False} and "a frame must be" in refused["error"] and "frame" not in refused
    offline = _offline(frames)
    for ours, theirs in zip(rest, offline[1:]):
        torch.testing.assert_close(ours, theirs.image.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("good_calls", [0, 2])
def test_a_model_failure_closes_with_1011_and_a_reason(good_calls, caplog):
    frames = _frames(4, seed=2)
    with _client() as client:
        engine = client.app.state.engine
        real = _with_failing_model(engine, good_calls)
        session, socket = _open(client)
        replies = []
        try:
            with caplog.at_level(logging.ERROR, logger="diffrt.serve.websocket"):
                for frame in frames[:good_calls]:
                    replies.append(_reply(socket, frame))
                socket.send_bytes(encode_npy(frames[good_calls]))
                last = json.loads(_receive(socket)["text"])
                closed = _receive(socket)
        finally:
            session.__exit__(None, None, None)
        engine.stream_pipeline = real
        _still_streams(client)
    assert len(replies) == good_calls and all(not isinstance(r, dict) or r == {"ready": False} for r in replies)
    assert last["code"] == 1011 and "the model failed" in last["error"] and "device lost" in last["error"]
    assert closed["type"] == "websocket.close" and closed["code"] == 1011
    assert "the model failed" in closed["reason"] and "request id" in closed["reason"]
    assert len(closed["reason"].encode()) <= 123
    assert any("the model failed" in r.getMessage() and r.exc_info for r in caplog.records)
