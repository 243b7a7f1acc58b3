"""The request and response schema of ``diffrt serve`` and its Ray Serve deployment (pydantic, so the
OpenAPI schema at ``/openapi.json`` says the same as the validation).

Requests are validated strictly: a JSON string, boolean or fraction where a number or an integer is
expected (``"steps": "2"``, ``"steps": true``, ``"steps": 2.5`` or ``2.0``, ``"seed": "7"``) is refused
(422), never converted; an integer is a number where a float is expected (``"guidance_scale": 3``).
:func:`describe_errors` turns pydantic's errors into the messages the server answers with: the field,
what it must be, and what it got (its JSON type and a short excerpt of a string).
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STEPS = 200
MAX_COND_VALUES = 1 << 20  # 4 MiB of float32 conditioning per request


STRICT = ConfigDict(extra="forbid", strict=True)  # no type coercion (module docstring)
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "model_type": "a JSON object",
             "dict_type": "a JSON object", "model_attributes_type": "a JSON object"}
_JSON_TYPES = ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"), (list, "a list"),
               (dict, "an object"), (type(None), "null"),
               (bytes, "a body that is not JSON (send Content-Type: application/json)"))


def json_type(value: Any) -> str:
    """``value``'s JSON type in words; a string with a short excerpt of it (``a string ('2')``)."""
    name = next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)
    if isinstance(value, str):
        return f"{name} ({value[:20]!r}{'...' if len(value) > 20 else ''})"
    if isinstance(value, float):
        return f"{name} ({value!r})"
    return name


def describe_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors as ``[{"loc": [...], "msg": ...}]``: a type error says what the field must be and the
    JSON type it got; the offending input is never echoed as a value (it may hold NaN, which JSON cannot carry)."""
    described = []
    for error in errors:
        kind, message = error.get("type", ""), error.get("msg", "").removeprefix("Value error, ")
        loc = [part for part in error.get("loc", ()) if part != "body"]
        expected = _EXPECTED.get(kind)
        if expected and "input" in error:
            message = f"must be {expected}, not {json_type(error['input'])}"
        elif kind == "missing" and not loc:
            message = "a JSON object body is required (Content-Type: application/json)"
        elif kind == "json_invalid":  # loc holds the character position
            reason = (error.get("ctx") or {}).get("error", "")
            message, loc = f"the body is not valid JSON ({reason or message} at character {loc[-1] if loc else 0})", []
        described.append({"loc": loc, "msg": message})
    return described


def error_summary(errors: list[dict[str, Any]], what: str = "request") -> str:
    """One line for :func:`describe_errors`' list: ``invalid request: steps: must be an integer, not ...``."""
    return f"invalid {what}: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in errors)


class GenerateRequest(BaseModel):
    """One sample: which model, its condition, the noise seed and the sampling settings."""

    model_config = STRICT

    model: str = Field(description="a model the server loaded (GET /healthz lists them)", examples=["digits-dit"])
    class_label: int | None = Field(None, ge=0, description="class-conditional models: the class (digits: 0-9)")
    cond: list[list[float]] | None = Field(None, description="embedding-conditioned models: [tokens][width] floats")
    seed: int = Field(0, ge=0, lt=2**63, description="the noise seed: the same seed gives the same sample")
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(3.0, ge=0.0, le=50.0, description="classifier-free guidance; null: none")
    solver: str = Field("dpmpp-2m", description="a diffrt solver preset (dpmpp-2m, ddim, unipc, ...)")
    acceleration: str = Field("exact", description="a named acceleration config the server offers")
    output: Literal["png", "latents"] = Field("png", description="a PNG image, or the raw sample as float32 .npy")

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite_scale(cls, value: Any) -> Any:
        """Before the range check, so NaN is refused as not finite (NaN <= 50 would say "at most 50")."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"guidance_scale must be a finite number, got {value}; give one in 0-50, or null for "
                             "no guidance")
        return value

    @field_validator("cond")
    @classmethod
    def _finite_cond(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is None:
            return value
        if not value or len({len(row) for row in value}) != 1 or not value[0]:
            raise ValueError("cond must be a non-empty rectangular [tokens][width] list")
        if len(value) * len(value[0]) > MAX_COND_VALUES:
            raise ValueError(f"cond has {len(value) * len(value[0])} values; at most {MAX_COND_VALUES}")
        if not all(math.isfinite(v) for row in value for v in row):
            raise ValueError("cond holds NaN or infinite values")
        return value

    @model_validator(mode="after")
    def _one_condition(self) -> GenerateRequest:
        if self.class_label is not None and self.cond is not None:
            raise ValueError("give class_label or cond, not both")
        return self


class LatentsResponse(BaseModel):
    """``output="latents"``: the sample as a base64 .npy (float32) and what produced it."""

    shape: list[int]
    dtype: str = "float32"
    npy_base64: str
    batch_size: int = Field(description="how many requests shared the model batch")
    latency_ms: float


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    accelerations: list[str]
    device: str
    queue_depth: int
    max_batch: int
    streams: int


class StreamConfig(BaseModel):
    """The first WebSocket message of ``/v1/stream`` (JSON); then binary .npy frames [C, H, W] in and out."""

    model_config = STRICT

    model: str
    class_label: int | None = Field(None, ge=0)
    t_index_list: list[int] = Field([32, 45], min_length=1, max_length=8)
    num_inference_steps: int = Field(50, ge=1, le=1000)
    seed: int = Field(0, ge=0, lt=2**63)
