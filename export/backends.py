"""``optimize(den, backend=...)`` for the engines outside PyTorch: ONNX Runtime and TensorRT.

``build(name, fast, calibration, precision=None, **options)`` turns an
:class:`~diffrt.runtime.optimized.OptimizedDenoiser` (its attention settings and INT8 calibration
included) into a Denoiser running on that engine:

* ``"onnxruntime"``: :func:`~diffrt.export.ort_backend.ort_denoiser` (CPU execution provider, or
  CUDA's where the tensors are on a GPU); options ``cache`` (a folder), ``batch``, ``resolution``,
  ``opset``, ``simplify``; precision is float32 (INT8 through the calibration's QDQ nodes);
* ``"tensorrt"``: :func:`~diffrt.export.tensorrt_backend.trt_denoiser`; options ``cache``,
  ``batch_range`` (min, opt, max), ``resolution_range``, ``workspace``, ``cuda_graphs``;
  ``precision`` torch.float16 / bfloat16 / float32, INT8 from the calibration.
"""
from __future__ import annotations

from typing import Any

import torch

from .artifacts import ArtifactCache


def build(name: str, fast, calibration, precision: torch.dtype | None = None, cache: Any = None, **options: Any):
    cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)
    if name == "onnxruntime":
        if precision not in (None, torch.float32):
            raise ValueError(f"backend='onnxruntime' runs float32 graphs (INT8 through a calibration), not {precision}")
        from .ort_backend import ort_denoiser  # noqa: PLC0415

        return ort_denoiser(fast, calibration, cache=cache, **options)
    if name == "tensorrt":
        from .tensorrt_backend import trt_denoiser  # noqa: PLC0415

        return trt_denoiser(fast, calibration, precision=precision or torch.float16, cache=cache, **options)
    raise ValueError(f"unknown backend {name!r}")
