"""diffrt serve against its own OpenAPI schema (schemathesis, in-process over ASGI): every generated request to
``POST /v1/generate``, ``GET /healthz`` and ``GET /metrics``, valid or not (and the other methods on those paths),
is answered without a 5xx, and what the server refuses is a 4xx with a message.

Two schemas drive it: the one the server publishes (``model``, ``solver`` and ``acceleration`` are free text, so
most generated requests stop at a 404 or 400), and the same schema narrowed to the names this server offers, so
the generated requests reach the sampler (every solver preset, steps 1-200, guidance, both outputs). The schema's
own bounds keep valid requests cheap enough (at most 200 steps of ``digits-dit``, about 3 s on a CPU). The long
variants (``fuzz_long``: DIFFRT_FUZZ_LONG=1) run many more examples. Nothing is timed.
"""
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from diffrt.runtime.solvers import PRESETS  # noqa: E402
from diffrt.serve import ServeConfig, create_app  # noqa: E402

SHORT = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
CONFIG = ServeConfig(models=("digits-dit",), max_wait_ms=1.0)  # batches of one: a lone request does not wait


@pytest.fixture
def app():
    """A server per test: schemathesis ends the app's lifespan (which stops the batcher) with each test."""
    served = create_app(CONFIG)
    yield served
    served.state.batcher.close()


@pytest.fixture
def published_schema(app):
    """The schema as ``GET /openapi.json`` publishes it."""
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
def served_names_schema(app):
    """The published schema with ``model``, ``solver`` and ``acceleration`` narrowed to what this server offers."""
    raw = TestClient(app).get("/openapi.json").json()  # no ``with``: the app's lifespan is not started and ended
    fields = raw["components"]["schemas"]["GenerateRequest"]["properties"]
    fields["model"]["enum"] = list(CONFIG.models)
    fields["solver"]["enum"] = sorted(PRESETS)
    fields["acceleration"]["enum"] = list(CONFIG.accelerations)
    schema = schemathesis.openapi.from_dict(raw)
    schema.app = app
    return schema


published = schemathesis.pytest.from_fixture("published_schema")
served_names = schemathesis.pytest.from_fixture("served_names_schema").include(method="POST", path="/v1/generate")


def _answered(case) -> None:
    """Call the server: no 5xx, and a 4xx says why, in the one error shape (``detail`` and ``request_id``, the
    server's or Starlette's own for a method or a path it cannot route)."""
    response = case.call_and_validate(checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        document = response.json()
        message = document.get("detail")
        assert isinstance(message, str) and message, f"{case.method} {case.path}: a {response.status_code} " \
                                                     f"without a message: {response.content[:300]!r}"
        request_id = response.headers.get("x-request-id")  # schemathesis gives each header as a list
        assert document.get("request_id") == (request_id[0] if isinstance(request_id, list) else request_id)


@published.parametrize()
@SHORT
def test_the_published_schema_never_gets_a_server_error(case):
    _answered(case)


@served_names.parametrize()
@SHORT
def test_requests_that_reach_the_sampler_never_get_a_server_error(case):
    _answered(case)


@pytest.mark.fuzz_long
@published.parametrize()
@LONG
def test_the_published_schema_never_gets_a_server_error_long(case):
    _answered(case)


@pytest.mark.fuzz_long
@served_names.parametrize()
@LONG
def test_requests_that_reach_the_sampler_never_get_a_server_error_long(case):
    _answered(case)
