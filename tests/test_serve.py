"""diffrt serve: round trips, dynamic batching, back-pressure, bad input, out-of-memory recovery, streams
and their slots, metrics. The server runs in-process (FastAPI's TestClient); nothing is timed."""
import base64
import concurrent.futures
import io
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from diffrt.runtime import Sampler, models  # noqa: E402
from diffrt.serve import ServeConfig, create_app  # noqa: E402
from diffrt.serve.engine import decode_npy, encode_npy  # noqa: E402


def _client(**options) -> TestClient:
    config = ServeConfig(**{"models": ("digits-dit", "sd15-unet:tiny"), "max_wait_ms": 300.0, **options})
    return TestClient(create_app(config))


def _latents(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return decode_npy(base64.b64decode(response.json()["npy_base64"]))


def _concurrently(client, bodies):
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post("/v1/generate", json=body), bodies))


def test_generate_round_trips_png_and_latents_equal_to_offline_sampling():
    from PIL import Image

    with _client() as client:
        png = client.post("/v1/generate", json={"model": "digits-dit", "class_label": 7, "steps": 5, "seed": 11})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (16, 16)
        served = _latents(client.post("/v1/generate", json={"model": "digits-dit", "class_label": 7, "steps": 5,
                                                            "seed": 11, "output": "latents"}))
        health = client.get("/healthz").json()
    assert health["status"] == "ok" and "digits-dit" in health["models"] and health["queue_depth"] == 0
    den = models.load("digits-dit")
    noise = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        offline = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0).sample(
            noise, cond=torch.tensor([7]), uncond=torch.tensor([models.NULL_CLASS]))
    torch.testing.assert_close(served, offline[0], rtol=1e-4, atol=1e-4)  # the same seed gives the same sample


def test_concurrent_compatible_requests_share_a_batch_and_other_settings_do_not():
    def bodies(**extra):
        return [{"model": "digits-dit", "class_label": i, "steps": 3, "seed": i, "output": "latents",
                 **{k: (v(i) if callable(v) else v) for k, v in extra.items()}} for i in range(6)]

    with _client(max_batch=6) as client:
        same = _concurrently(client, bodies())
        assert [r.json()["batch_size"] for r in same] == [6] * 6  # merged into one model batch
        scales = lambda i: 3.0 if i % 2 else 2.0  # noqa: E731
        mixed = _concurrently(client, bodies(guidance_scale=scales))
        assert [r.json()["batch_size"] for r in mixed] == [6] * 6  # guidance is combined per row: one batch
        adaptive = _concurrently(client, bodies(guidance_scale=scales, acceleration="fast"))
        assert [r.json()["batch_size"] for r in adaptive] == [3] * 6  # adaptive guidance decides per scale
        steps = _concurrently(client, bodies(steps=lambda i: 3 if i % 2 else 4))
        assert [r.json()["batch_size"] for r in steps] == [3] * 6  # one plan per batch: one per step count
        alone = _latents(client.post("/v1/generate", json=bodies()[1]))
        torch.testing.assert_close(_latents(same[1]), alone, rtol=1e-4, atol=1e-4)  # batching changes nothing
        metrics = client.get("/metrics").text
    assert "diffrt_batch_size_count 7.0" in metrics and 'diffrt_requests_total{status="200"}' in metrics
    den = models.load("digits-dit")
    for i in (0, 1):  # each row of the mixed batch is its own scale's sample
        noise = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            offline = Sampler(den, "dpmpp-2m", 3, guidance_scale=scales(i)).sample(
                noise, cond=torch.tensor([i]), uncond=torch.tensor([models.NULL_CLASS]))
        torch.testing.assert_close(_latents(mixed[i]), offline[0], rtol=1e-4, atol=1e-4)


def test_a_full_queue_answers_503_with_retry_after_and_the_server_recovers():
    started, release = threading.Event(), threading.Event()
    with _client(max_batch=1, max_queue=2, max_wait_ms=0.0) as client:
        engine = client.app.state.engine
        real_run = engine.run

        def slow_run(requests):
            started.set()
            release.wait(30)
            return real_run(requests)

        engine.run = slow_run
        body = {"model": "digits-dit", "class_label": 1, "steps": 2, "output": "latents"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.post, "/v1/generate", json=body)
            assert started.wait(30)  # the worker holds the first request
            queued = [pool.submit(client.post, "/v1/generate", json=body) for _ in range(2)]
            while client.app.state.batcher.depth < 2:
                threading.Event().wait(0.01)
            refused = client.post("/v1/generate", json=body)
            release.set()
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "queue is full" in refused.json()["detail"]
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        engine.run = real_run
        assert client.post("/v1/generate", json=body).status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope"}, 404, "unknown model 'nope'"),
    ({"model": "digits-dit", "acceleration": "warp"}, 400, "unknown acceleration 'warp'"),
    ({"model": "digits-dit", "solver": "magic"}, 400, "unknown solver 'magic'"),
    ({"model": "digits-dit", "class_label": 10}, 400, "out of range"),
    ({"model": "digits-dit", "cond": [[0.5, 0.5]]}, 400, "class-conditional"),
    ({"model": "sd15-unet:tiny", "class_label": 1}, 400, "takes embeddings"),
    ({"model": "sd15-unet:tiny", "cond": [[0.1] * 32] * 5, "output": "latents"}, 400, "cond must be [77, 32]"),
    ({"model": "sd15-unet:tiny", "steps": 2}, 400, "ask for output='latents'"),
    ({"model": "digits-dit", "steps": 0}, 422, "steps"),
    ({"model": "digits-dit", "steps": 5000}, 422, "steps"),
    ({"model": "digits-dit", "cond": [[1.0], [1.0, 2.0]]}, 422, "rectangular"),
    ({"model": "digits-dit", "colour": "red"}, 422, "colour"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(body, status, message):
    with _client() as client:
        response = client.post("/v1/generate", json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        assert client.post("/v1/generate", json={"model": "digits-dit", "steps": 2}).status_code == 200


def test_nan_oversized_and_malformed_bodies_are_refused():
    with _client(max_body_bytes=4096) as client:
        headers = {"content-type": "application/json"}
        nan_cond = b'{"model": "sd15-unet:tiny", "output": "latents", "cond": [[NaN, 1.0]]}'
        response = client.post("/v1/generate", content=nan_cond, headers=headers)
        assert response.status_code == 422 and "NaN" in response.json()["detail"]
        response = client.post("/v1/generate", content=b'{"model": "digits-dit", "guidance_scale": NaN}', headers=headers)
        assert response.status_code == 422
        response = client.post("/v1/generate", content=b"{not json", headers=headers)
        assert response.status_code == 422
        big = {"model": "sd15-unet:tiny", "output": "latents", "cond": [[0.25] * 32] * 77}
        response = client.post("/v1/generate", json=big)
        assert response.status_code == 413 and "at most 4096" in response.json()["detail"]
        assert client.post("/v1/generate", json={"model": "digits-dit", "steps": 2}).status_code == 200


def test_out_of_memory_fails_its_batch_with_503_then_batches_shrink_and_serving_goes_on():
    with _client(max_batch=8, max_wait_ms=200.0) as client:
        engine = client.app.state.engine
        real_run, calls = engine.run, []

        def run_once_out_of_memory(requests):
            calls.append(len(requests))
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_run(requests)

        engine.run = run_once_out_of_memory
        failed = _concurrently(client, [{"model": "digits-dit", "class_label": i, "steps": 2, "output": "latents"}
                                        for i in range(4)])
        assert [r.status_code for r in failed] == [503] * 4 and all("retry-after" in r.headers for r in failed)
        assert "out of GPU memory" in failed[0].json()["detail"]
        assert client.app.state.batcher.max_batch == 2  # halved from the failed batch of 4
        again = _concurrently(client, [{"model": "digits-dit", "class_label": i, "steps": 2, "output": "latents"}
                                       for i in range(4)])
        assert [r.status_code for r in again] == [200] * 4
        assert max(r.json()["batch_size"] for r in again) <= 2


def test_stream_round_trip_equals_the_pipeline_offline():
    from diffrt.runtime.stream import StreamPipeline

    frames = [torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(4)]
    with _client() as client, client.websocket_connect("/v1/stream") as socket:
        socket.send_json({"model": "digits-dit", "class_label": 4, "t_index_list": [20, 40], "seed": 3})
        assert socket.receive_json() == {"ready": False, "accepted": True}
        served = []
        for frame in frames:
            socket.send_bytes(encode_npy(frame))
            message = socket.receive()
            served.append(decode_npy(message["bytes"]) if message.get("bytes") is not None else None)
        socket.send_bytes(encode_npy(torch.full((1, 8, 8), 0.5)))  # the wrong frame size: an error, not a crash
        assert "a frame must be [1, 16, 16]" in socket.receive_json()["error"]
    pipe = StreamPipeline(models.load("digits-dit"), t_index_list=(20, 40), cond=torch.tensor(4), seed=3)
    offline = [pipe.tick(frame) for frame in frames]
    assert served[0] is None and not offline[0].ready  # the stream batch fills first
    for ours, theirs in zip(served[1:], offline[1:]):
        torch.testing.assert_close(ours, theirs.image.float(), rtol=1e-4, atol=1e-4)


def test_stream_slots_are_bounded_and_a_disconnect_frees_its_slot():
    with _client(max_streams=1) as client:
        with client.websocket_connect("/v1/stream") as first:
            first.send_json({"model": "digits-dit"})
            first.receive_json()
            with pytest.raises(WebSocketDisconnect) as busy:
                with client.websocket_connect("/v1/stream") as second:
                    second.receive_json()
            assert busy.value.code == 1013
            assert client.get("/healthz").json()["streams"] == 1
        for _ in range(100):  # the server notices the disconnect
            if client.get("/healthz").json()["streams"] == 0:
                break
            threading.Event().wait(0.02)
        assert client.get("/healthz").json()["streams"] == 0
        with client.websocket_connect("/v1/stream") as third:  # the slot is free again
            third.send_json({"model": "digits-dit", "t_index_list": [99], "num_inference_steps": 50})
            assert "below num_inference_steps" in third.receive_json()["error"]


def test_openapi_schema_describes_the_request():
    with _client() as client:
        schema = client.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"] and "/healthz" in schema["paths"]
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert {"model", "class_label", "cond", "seed", "steps", "guidance_scale", "acceleration"} <= set(request["properties"])
    assert np.isfinite(request["properties"]["steps"]["maximum"])


def test_load_script_smoke_run_writes_sane_rows(tmp_path):
    """bench/load_serve.py on loopback, bounded (12 answers per level, 40 in the soak): it runs, the server
    batches under concurrency, nothing fails. No speed is asserted."""
    import json

    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from diffrt.bench import load_serve

    assert load_serve.main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    document = json.loads(next(tmp_path.glob("*-serve-load.json")).read_text())
    rows = document["rows"]
    assert [r["phase"] for r in rows] == ["closed-loop", "closed-loop", "soak"]
    for row in rows:
        assert row["errors"] == {} and row["answered"] >= 12 and row["throughput_per_s"] > 0
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
    assert rows[1]["mean_batch"] > 1  # four concurrent clients were batched together
    assert len(rows[2]["rss_mib"]) >= 3 and all(mib > 0 for _, mib in rows[2]["rss_mib"])


def test_the_engine_keeps_no_tensors_from_batch_to_batch():
    """A leak check for the soak's claim: after warm-up, more batches (per-row guidance, so a fresh
    RowGuidance sampler per batch) leave the number of live tensors unchanged."""
    import gc

    from diffrt.serve.engine import Engine
    from diffrt.serve.schema import GenerateRequest

    engine = Engine(ServeConfig(models=("digits-dit",)))
    requests = [GenerateRequest(model="digits-dit", class_label=i, steps=2, seed=i, output="latents",
                                guidance_scale=3.0 if i % 2 else 2.0) for i in range(4)]

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(3):
        engine.run(requests)
    before = live_tensors()
    for _ in range(25):
        results = engine.run(requests)
    del results
    assert live_tensors() == before


def test_a_tuned_int8_config_is_served_from_another_working_directory(tmp_path, monkeypatch):
    """--acceleration NAME=PATH: the config's calibration path is relative to the file, not to the server's cwd."""
    from diffrt.export import calibrate
    from diffrt.runtime.acceleration import Acceleration

    den = models.load("digits-dit")
    labels = torch.arange(4)
    calibrate(den, "dpmpp-2m", 3, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS), seeds=(9,),
              progress=False).save(tmp_path / "cfg" / "calibration")
    config = Acceleration(steps=3, int8={"path": "calibration", "groups": "auto"}).save(tmp_path / "cfg" / "tuned.json")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with _client(accelerations={"tuned": str(config)}) as client:
        response = client.post("/v1/generate", json={"model": "digits-dit", "class_label": 2, "steps": 3,
                                                      "acceleration": "tuned", "output": "latents"})
        assert response.status_code == 200, response.text
        wrong_plan = client.post("/v1/generate", json={"model": "digits-dit", "steps": 5, "acceleration": "tuned"})
        assert wrong_plan.status_code == 400 and "steps=3" in wrong_plan.json()["detail"]  # not silently overridden
