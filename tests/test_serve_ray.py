"""The Ray Serve deployment on a local Ray instance (CPU): two replicas, the request schema of diffrt serve,
requests spread over both replicas and batched on each, errors answered as 4xx."""
import base64
import concurrent.futures
import io
import socket

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from diffrt.serve.ray import app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"models": ["digits-dit"], "max_batch": 8}, num_replicas=2, num_cpus=0.5), route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_requests_spread_over_two_replicas_and_share_batches(url):
    from PIL import Image

    def post(i):
        body = {"model": "digits-dit", "class_label": i % 10, "steps": 3, "seed": i}
        return httpx.post(url, json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert len({b["replica"] for b in bodies}) == 2  # Ray Serve's router used both replicas
    assert max(b["batch_size"] for b in bodies) > 1  # @serve.batch gathered concurrent requests
    assert Image.open(io.BytesIO(base64.b64decode(bodies[0]["png_base64"]))).size == (16, 16)


def test_the_same_schema_and_errors_as_the_fastapi_server(url):
    assert httpx.post(url, json={"model": "nope"}, timeout=60).status_code == 404
    response = httpx.post(url, json={"model": "digits-dit", "steps": 0}, timeout=60)
    assert response.status_code == 422 and "steps" in response.json()["detail"] and response.json()["request_id"]
    response = httpx.post(url, json={"model": "digits-dit", "steps": "2"}, timeout=60)  # strict: not coerced
    assert response.status_code == 422 and "steps: must be an integer, not a string ('2')" in response.json()["detail"]
    response = httpx.post(url, json={"model": "digits-dit", "class_label": 3, "steps": 2, "output": "latents"},
                          timeout=60)
    assert response.status_code == 200 and response.json()["shape"] == [1, 16, 16]


def test_the_cluster_config_file_is_a_valid_serve_config():
    """runtime/serve/ray-cluster.yaml parses as a Ray Serve deploy config and names an importable builder."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parent.parent / "runtime" / "serve" / "ray-cluster.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    application = config.applications[0]
    module, _, name = application.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    deployment = application.deployments[0]
    assert deployment.ray_actor_options.num_gpus == 1 and deployment.autoscaling_config["max_replicas"] >= 2
