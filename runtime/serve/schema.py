"""The request and response schema of ``diffrt serve`` and its Ray Serve deployment (pydantic, so the
OpenAPI schema at ``/openapi.json`` says the same as the validation)."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STEPS = 200
MAX_COND_VALUES = 1 << 20  # 4 MiB of float32 conditioning per request


def _finite(value: float | str) -> bool:
    """Whether a number (or its text) is finite; text that is no number passes (the type check refuses it)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return True


class GenerateRequest(BaseModel):
    """One sample: which model, its condition, the noise seed and the sampling settings."""

    model_config = ConfigDict(extra="forbid")

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
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and not _finite(value):
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

    model_config = ConfigDict(extra="forbid")

    model: str
    class_label: int | None = Field(None, ge=0)
    t_index_list: list[int] = Field([32, 45], min_length=1, max_length=8)
    num_inference_steps: int = Field(50, ge=1, le=1000)
    seed: int = Field(0, ge=0, lt=2**63)
