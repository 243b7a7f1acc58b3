"""diffrt serve under faults: the body limit while reading (chunked too), abandoned requests dropped before
their batch, precise 4xx for bad requests and a logged 500 with a request id for the unexpected, unknown
models refused at startup, WebSocket close codes, idle streams and a full house. After each fault a good
request is still served. Loopback only (FastAPI's TestClient, or uvicorn on 127.0.0.1 where a real
connection matters); every wait is bounded in count and time; nothing is timed for speed."""
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402

from diffrt.serve import Engine, ServeConfig, create_app  # noqa: E402
from diffrt.serve.batcher import Batcher  # noqa: E402
from diffrt.serve.engine import encode_npy  # noqa: E402
from diffrt.serve.middleware import ServeMiddleware  # noqa: E402
from diffrt.serve.schema import GenerateRequest  # noqa: E402

GOOD = {"model": "digits-dit", "class_label": 3, "steps": 2, "output": "latents"}
GOOD_STREAM = {"model": "digits-dit", "class_label": 4, "t_index_list": [20, 40]}


def _client(**options) -> TestClient:
    return TestClient(create_app(ServeConfig(**{"models": ("digits-dit",), "max_wait_ms": 5.0, **options})))


def _still_serving(client: TestClient) -> None:
    response = client.post("/v1/generate", json=GOOD)
    assert response.status_code == 200, response.text


def _wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@contextlib.contextmanager
def _live_server(app):
    """uvicorn on 127.0.0.1 (a free port) in a thread; yields the port."""
    uvicorn = pytest.importorskip("uvicorn")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait_until(lambda: server.started, 60), "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------------------------- (1) body limit

def _run_middleware(limit: int, headers: list, chunks: int, chunk: bytes) -> tuple[int, list[dict]]:
    """Drive ServeMiddleware around an app that reads the whole body; (receive calls, messages sent)."""
    calls, sent = 0, []

    async def receive():
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": chunk, "more_body": calls < chunks}

    async def send(message):
        sent.append(message)

    async def reading_app(scope, receive, send):
        from starlette.requests import Request

        await Request(scope, receive).body()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": headers}
    asyncio.run(ServeMiddleware(reading_app, max_body_bytes=limit)(scope, receive, send))
    return calls, sent


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    calls, sent = _run_middleware(1000, [], chunks=10_000, chunk=b"x" * 300)
    assert calls == 4  # 1200 bytes read of 3 MB: reading stopped at the limit
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert "at most 1000 bytes" in json.loads(sent[1]["body"])["detail"]


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    calls, sent = _run_middleware(1000, [(b"content-length", b"5000000")], chunks=1, chunk=b"")
    assert calls == 0 and sent[0]["status"] == 413
    assert "5000000 bytes; at most 1000" in json.loads(sent[1]["body"])["detail"]


def test_chunked_bodies_over_the_limit_get_413_from_the_server_and_serving_goes_on():
    def chunks(count: int):
        yield b'{"model": "digits-dit", "cond": [['
        for _ in range(count):
            yield b"0.25, " * 1000
        yield b"0.25]]}"

    with _client(max_body_bytes=4096) as client:
        response = client.post("/v1/generate", content=chunks(100), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "at most 4096 bytes" in response.json()["detail"]
        _still_serving(client)
    app = create_app(ServeConfig(models=("digits-dit",), max_body_bytes=64 << 10, max_wait_ms=5.0))
    httpx = pytest.importorskip("httpx")
    with _live_server(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        response = http.post("/v1/generate", content=chunks(2000), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "at most 65536 bytes" in response.json()["detail"]  # 12 MB not read
        assert http.post("/v1/generate", json=GOOD).status_code == 200


# ------------------------------------------------------------------------------ (2) disconnected clients

class _FakeEngine:
    """key() and run() of an Engine: run blocks until released and records the seeds it ran."""

    def __init__(self):
        self.release, self.ran = threading.Event(), []

    def key(self, request):
        return (request.model,)

    def run(self, requests):
        assert self.release.wait(30)
        self.ran.append([r.seed for r in requests])
        return [r.seed for r in requests]


def test_the_batcher_drops_cancelled_requests_and_frees_their_queue_places():
    engine = _FakeEngine()
    batcher = Batcher(engine, max_batch=8, max_wait_ms=0.0, max_queue=4)
    try:
        held = batcher.submit(GenerateRequest(model="m", seed=0))
        assert _wait_until(lambda: batcher.depth == 0)  # the worker holds it (blocked in run)
        queued = [batcher.submit(GenerateRequest(model="m", seed=s)) for s in range(1, 5)]
        assert batcher.depth == 4
        for future in queued[:3]:
            assert future.cancel()  # the clients went away
        assert batcher.depth == 1  # at once, not when a batch is formed
        extra = [batcher.submit(GenerateRequest(model="m", seed=s)) for s in (5, 6, 7)]  # the places are free
        engine.release.set()
        assert held.result(30) == 0 and queued[3].result(30) == 4 and [f.result(30) for f in extra] == [5, 6, 7]
        assert sorted(seed for batch in engine.ran for seed in batch) == [0, 4, 5, 6, 7]  # 1-3 never ran
    finally:
        engine.release.set()
        batcher.close()


def _post_and_hang_up(port: int, count: int) -> list[socket.socket]:
    body = json.dumps({**GOOD, "seed": 99}).encode()
    raw = (b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sockets = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(raw)
        sockets.append(connection)
    return sockets


def test_requests_of_disconnected_clients_never_reach_a_batch():
    httpx = pytest.importorskip("httpx")
    app = create_app(ServeConfig(models=("digits-dit",), max_batch=4, max_wait_ms=5.0))
    engine, batcher, ran = app.state.engine, app.state.batcher, []
    entered, gate = threading.Event(), threading.Event()
    real_run = engine.run

    def gated_run(requests):
        entered.set()
        assert gate.wait(60)
        ran.append([r.seed for r in requests])
        return real_run(requests)

    engine.run = gated_run
    with _live_server(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        gate.set()
        assert http.post("/v1/generate", json=GOOD).status_code == 200  # the model is loaded
        entered.clear()
        gate.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(http.post, "/v1/generate", json={**GOOD, "seed": 1})
            assert entered.wait(60)  # the worker holds this batch: what comes next queues
            abandoned = _post_and_hang_up(port, 12)
            assert _wait_until(lambda: batcher.depth == 12), batcher.depth
            for connection in abandoned:
                connection.close()
            assert _wait_until(lambda: batcher.depth == 0), batcher.depth  # dropped while still queued
            gate.set()
            assert held.result(60).status_code == 200
        assert http.post("/v1/generate", json={**GOOD, "seed": 2}).status_code == 200
    assert 99 not in [seed for batch in ran for seed in batch]  # the abandoned requests' seed


# ------------------------------------------------------------------------- (3) bad requests, the catch-all

@pytest.mark.parametrize("body, status, message", [
    ({**GOOD, "solver": "lcm", "steps": 51}, 400, "ask for steps <= 50 with solver 'lcm'"),
    ({**GOOD, "solver": "flow-euler"}, 400, "needs a flow-matching denoiser"),
    ({**GOOD, "solver": "flow-euler"}, 400, "ask for another solver such as dpmpp-2m"),
])
def test_a_plan_the_model_cannot_run_is_a_400_saying_what_to_change(body, status, message):
    with _client() as client:
        response = client.post("/v1/generate", json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        _still_serving(client)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_guidance_is_refused_as_not_finite(value):
    with _client() as client:
        body = b'{"model": "digits-dit", "steps": 2, "output": "latents", "guidance_scale": %s}' % value
        response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert "guidance_scale must be a finite number" in response.json()["detail"]
        assert "less than or equal" not in response.json()["detail"]
        _still_serving(client)


@pytest.mark.parametrize("field, value, message", [
    ("steps", "2", "steps: must be an integer, not a string ('2')"),
    ("steps", True, "steps: must be an integer, not a boolean"),
    ("steps", 2.0, "steps: must be an integer, not a number (2.0)"),
    ("steps", 2.5, "steps: must be an integer, not a number (2.5)"),
    ("seed", "7", "seed: must be an integer, not a string ('7')"),
    ("class_label", "3", "class_label: must be an integer, not a string ('3')"),
    ("class_label", False, "class_label: must be an integer, not a boolean"),
    ("guidance_scale", "3.0", "guidance_scale: must be a number, not a string ('3.0')"),
    ("guidance_scale", True, "guidance_scale: must be a number, not a boolean"),
    ("guidance_scale", "NaN", "guidance_scale: must be a number, not a string ('NaN')"),
    ("model", 5, "model: must be a string, not an integer"),
    ("cond", [["0.5"]], "cond.0.0: must be a number, not a string ('0.5')"),
])
def test_type_confusions_are_refused_not_coerced(field, value, message):
    """Strict validation: a string, boolean or fraction where a number is expected is a 422 naming the field,
    what it must be and what it got (pydantic's lax mode would have taken "2" for 2 and true for 1)."""
    with _client() as client:
        response = client.post("/v1/generate", json={**GOOD, field: value})
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"], response.json()
        assert {"loc": [field, 0, 0] if field == "cond" else [field], "msg": message.split(": ", 1)[1]} \
            in response.json()["errors"]
        _still_serving(client)


def test_numbers_keep_their_documented_forms():
    """An integer where a number is expected is a number (``"guidance_scale": 3``); null turns guidance off."""
    with _client() as client:
        for changes in ({"guidance_scale": 3}, {"guidance_scale": None}, {"seed": 2**62}, {"class_label": 0}):
            response = client.post("/v1/generate", json={**GOOD, **changes})
            assert response.status_code == 200, (changes, response.text)


def _error_shape(response, status: int) -> dict:
    """The body of an error answer: one shape whoever wrote it ({"detail", "request_id"}, 422: "errors")."""
    assert response.status_code == status, response.text
    document = response.json()
    assert set(document) == ({"detail", "request_id", "errors"} if status == 422 else {"detail", "request_id"})
    assert isinstance(document["detail"], str) and document["detail"]
    assert document["request_id"] == response.headers["x-request-id"]
    return document


def test_every_error_answer_has_one_shape_starlettes_too():
    with _client(max_body_bytes=4096) as client:
        assert _error_shape(client.get("/no/such/path"), 404)["detail"] == "Not Found"
        refused = client.get("/v1/generate")
        assert _error_shape(refused, 405)["detail"] == "Method Not Allowed" and refused.headers["allow"] == "POST"
        assert "unknown model" in _error_shape(client.post("/v1/generate", json={**GOOD, "model": "nope"}), 404)["detail"]
        assert "unknown solver" in _error_shape(client.post("/v1/generate", json={**GOOD, "solver": "x"}), 400)["detail"]
        invalid = _error_shape(client.post("/v1/generate", json={**GOOD, "steps": 0}), 422)
        assert invalid["detail"].startswith("invalid request: steps: ") and invalid["errors"][0]["loc"] == ["steps"]
        malformed = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert "the body is not valid JSON" in _error_shape(malformed, 422)["detail"]
        listed = _error_shape(client.post("/v1/generate", json=[GOOD]), 422)["detail"]
        assert "must be a JSON object, not a list" in listed
        deep = client.post("/v1/generate", content=b"[" * 2000 + b"]" * 2000,  # past json's recursion limit
                           headers={"content-type": "application/json"})
        assert "could not be parsed as a JSON object" in _error_shape(deep, 400)["detail"]
        big = client.post("/v1/generate", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
        assert "at most 4096" in _error_shape(big, 413)["detail"]
        chosen = client.get("/nowhere", headers={"X-Request-Id": "client-id-8"})
        assert _error_shape(chosen, 404)["request_id"] == "client-id-8"
        _still_serving(client)


def test_an_unexpected_error_is_a_logged_500_carrying_the_request_id(caplog):
    with _client() as client:
        engine, real_run = client.app.state.engine, client.app.state.engine.run

        def broken_run(requests):
            raise RuntimeError("a bug in the engine")

        engine.run = broken_run
        with caplog.at_level(logging.ERROR, logger="diffrt.serve.middleware"):
            response = client.post("/v1/generate", json=GOOD)
        request_id = response.headers["x-request-id"]
        assert response.status_code == 500 and response.json()["request_id"] == request_id
        assert request_id in response.json()["detail"] and "a bug" not in response.json()["detail"]
        assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
        chosen = client.post("/v1/generate", json=GOOD, headers={"X-Request-Id": "client-id-7"})
        assert chosen.status_code == 500 and chosen.json()["request_id"] == "client-id-7"
        engine.run = real_run
        response = client.post("/v1/generate", json=GOOD)
        assert response.status_code == 200 and len(response.headers["x-request-id"]) == 16


# ------------------------------------------------------------------------------ (4) unknown models at startup

@pytest.mark.parametrize("models, named", [(("digits-dit", "nope"), "'nope'"), (("digits-dit:huge",), "'digits-dit:huge'"),
                                           ((), "no models")])
def test_an_unknown_model_stops_the_server_at_startup(models, named):
    with pytest.raises(ValueError) as refused:
        create_app(ServeConfig(models=models))
    assert named in str(refused.value) and "digits-dit" in str(refused.value) and "sd15-unet" in str(refused.value)
    with pytest.raises(ValueError, match="unknown model"):
        Engine(ServeConfig(models=("nope",)))


# ---------------------------------------------------------------------------------------- (5) WebSockets

def _receive(session, seconds: float = 30.0) -> dict:
    """The next message of a TestClient WebSocket, waited for in a daemon thread (bounded)."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(session.receive()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"no message within {seconds} s"
    return box[0]


def _closed_with(session) -> tuple[int, str, str | None]:
    """Read until the close (at most 3 messages): (code, reason, the last error message sent)."""
    error = None
    for _ in range(3):
        message = _receive(session)
        if message["type"] == "websocket.close":
            return message["code"], message.get("reason", ""), error
        error = json.loads(message["text"]).get("error") if message.get("text") else error
    raise AssertionError("the stream was not closed")


def _stream_still_served(client: TestClient) -> None:
    assert _wait_until(lambda: client.get("/healthz").json()["streams"] == 0)  # the failed stream freed its slot
    with client.websocket_connect("/v1/stream") as session:
        session.send_json(GOOD_STREAM)
        assert _receive(session)["text"] == json.dumps({"ready": False, "accepted": True}, separators=(",", ":"))
        session.send_bytes(encode_npy(torch.zeros(1, 16, 16)))
        assert json.loads(_receive(session)["text"]) == {"ready": False}


def _send_frame_after_config(payload):
    def send(session):
        session.send_json(GOOD_STREAM)
        assert json.loads(_receive(session)["text"])["accepted"]
        payload(session)
    return send


@pytest.mark.parametrize("send, code, reason", [
    (lambda s: s.send_bytes(b"\x00\x01"), 1003, "expected a JSON config (text)"),
    (lambda s: s.send_text("{not json"), 1007, "the config is not JSON"),
    (lambda s: s.send_text("[1, 2]"), 1007, "a JSON object"),
    (lambda s: s.send_json({"model": "digits-dit", "colour": "red"}), 1007, "invalid config: colour"),
    (lambda s: s.send_json({"model": "nope"}), 1008, "unknown model 'nope'"),
    (lambda s: s.send_json({"model": "digits-dit", "t_index_list": [99]}), 1008, "below num_inference_steps"),
    (lambda s: s.send_json({**GOOD_STREAM, "class_label": 10}), 1008, "class_label 10 out of range"),
    (lambda s: s.send_json({**GOOD_STREAM, "num_inference_steps": "50"}), 1007,
     "num_inference_steps: must be an integer, not a string ('50')"),
    (_send_frame_after_config(lambda s: s.send_text("a frame?")), 1003, "expected binary .npy frames"),
    (_send_frame_after_config(lambda s: s.send_bytes(b"not npy")), 1007, "a frame must be a .npy float array"),
    (_send_frame_after_config(lambda s: s.send_bytes(b"\x00" * 5000)), 1009, "at most 4096"),
])
def test_stream_errors_close_with_a_code_and_a_reason(send, code, reason):
    with _client(max_body_bytes=4096) as client:
        with client.websocket_connect("/v1/stream") as session:
            send(session)
            closed_code, closed_reason, error = _closed_with(session)
        assert closed_code == code and reason in closed_reason and reason in error
        _stream_still_served(client)


def test_an_internal_stream_error_closes_with_1011_and_the_request_id(caplog):
    with _client() as client:
        engine, real = client.app.state.engine, client.app.state.engine.stream_pipeline

        def broken(config):
            raise RuntimeError("a bug in the stream")

        engine.stream_pipeline = broken
        with caplog.at_level(logging.ERROR, logger="diffrt.serve.websocket"), \
                client.websocket_connect("/v1/stream") as session:
            session.send_json(GOOD_STREAM)
            code, reason, _ = _closed_with(session)
        assert code == 1011 and "request id" in reason
        request_id = reason.rsplit(" ", 1)[-1].rstrip(")")
        assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
        engine.stream_pipeline = real
        _stream_still_served(client)


def test_an_idle_stream_is_closed_after_the_timeout_and_frees_its_slot():
    with _client(max_streams=1, stream_idle_timeout_s=0.3) as client:
        with client.websocket_connect("/v1/stream") as session:  # sends no config
            code, reason, _ = _closed_with(session)
        assert code == 1008 and "idle" in reason and "expected a config" in reason
        _stream_still_served(client)


def test_a_full_house_is_accepted_then_closed_with_1013():
    with _client(max_streams=1) as client:
        with client.websocket_connect("/v1/stream") as first:
            first.send_json(GOOD_STREAM)
            assert json.loads(_receive(first)["text"])["accepted"]
            with client.websocket_connect("/v1/stream") as second:  # accepted: no HTTP 403
                code, reason, _ = _closed_with(second)
            assert code == 1013 and "try again later" in reason
        _stream_still_served(client)


def test_a_full_house_on_a_real_server_closes_with_1013_not_http_403():
    sync_client = pytest.importorskip("websockets.sync.client")
    from websockets.exceptions import ConnectionClosed

    app = create_app(ServeConfig(models=("digits-dit",), max_streams=1, max_wait_ms=5.0))
    with _live_server(app) as port:
        url = f"ws://127.0.0.1:{port}/v1/stream"
        with sync_client.connect(url, open_timeout=30, close_timeout=5) as first:
            first.send(json.dumps(GOOD_STREAM))
            assert json.loads(first.recv(timeout=60))["accepted"]
            second = sync_client.connect(url, open_timeout=30, close_timeout=5)  # the handshake succeeds
            with second, pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=30)
            assert closed.value.rcvd.code == 1013 and "try again later" in closed.value.rcvd.reason
