"""Launcher of the INT8 linear: checks, backend choice, tile choice, launch.

``int8_linear(x, w_q, w_scale, row_scale, bias=None, activation=None, inv_smooth=None,
out_dtype=None, backend="auto")`` computes the spec of :mod:`diffrt.kernels.int8_spec`:

    x          [M, K] fp16 / bf16 / fp32 (quantized inside, per row) or int8 (already quantized)
    w_q        int8 [N, K] (``quantize_weight``), w_scale fp32 [N]
    row_scale  fp32 [M], bias [N] or None, inv_smooth fp32 [K] or None (SmoothQuant)
    activation None / "gelu" / "silu"; out_dtype: x's dtype (fp32 for int8 x), or torch.int32 for
    the raw accumulator

Backends, in the order "auto" tries them:

* ``triton``: :mod:`diffrt.kernels.int8_triton` on CUDA (compute capability >= 8.0; on CPU tensors
  only under ``TRITON_INTERPRET=1`` and by name);
* ``torch``: quantize in PyTorch, ``torch._int_mm`` for int8 x int8 -> int32, the epilogue in
  PyTorch (CPU; on CUDA where _int_mm's shape rules hold: M > 16, K and N multiples of 8);
* ``reference``: the spec in int64 arithmetic.

On CUDA the tile is autotuned once per shape class (:mod:`diffrt.kernels.autotune`).
"""
from __future__ import annotations

import torch

from . import autotune, registry
from .int8_spec import ACTIVATIONS, epilogue, int8_linear_reference, quantize

OP = "int8_linear"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _features(x, w_q, w_scale, row_scale, bias=None, activation=None, inv_smooth=None, out_dtype=None) -> dict:
    return {"device": x.device.type, "index": x.device.index, "dtype": str(x.dtype).replace("torch.", ""),
            "m": x.shape[0], "k": x.shape[1], "n": w_q.shape[0]}


def _torch_problem(features: dict) -> str | None:
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if features["device"] == "cuda" and not (features["m"] > 16 and features["k"] % 8 == 0 and features["n"] % 8 == 0):
        return f"torch._int_mm on CUDA needs M > 16 and K, N multiples of 8; got M={features['m']}, K={features['k']}, " \
               f"N={features['n']}"
    return None


def _check(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype) -> None:
    if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"int8_linear: x must be [M, K] and w_q [N, K]; got x {tuple(x.shape)}, w_q {tuple(w_q.shape)}")
    if x.dtype not in FLOAT_DTYPES + (torch.int8,):
        raise TypeError(f"int8_linear: x has dtype {x.dtype}; expected float16 / bfloat16 / float32 or int8")
    if w_q.dtype != torch.int8:
        raise TypeError(f"int8_linear: w_q must be int8 (quantize_weight), got {w_q.dtype}")
    m, k = x.shape
    n = w_q.shape[0]
    for name, t, size in (("w_scale", w_scale, n), ("row_scale", row_scale, m), ("bias", bias, n),
                          ("inv_smooth", inv_smooth, k)):
        if t is None:
            continue
        if t.shape != (size,):
            raise ValueError(f"int8_linear: {name} must be [{size}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"int8_linear: {name} is on {t.device}, x on {x.device}")
        if name != "bias" and t.dtype != torch.float32:
            raise TypeError(f"int8_linear: {name} must be float32, got {t.dtype}")
    if w_q.device != x.device:
        raise ValueError(f"int8_linear: w_q is on {w_q.device}, x on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES + (torch.int32,):
        raise TypeError(f"int8_linear: out_dtype must be a float dtype or torch.int32, got {out_dtype}")


def _out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)


def _run_reference(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype):
    return int8_linear_reference(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, _out_dtype(x, out_dtype))


def _run_torch(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype):
    if x.dtype == torch.int8:
        x_q = x
    else:
        v = x.float() if inv_smooth is None else x.float() * inv_smooth
        x_q = quantize(v, row_scale[:, None])
    acc = torch._int_mm(x_q.contiguous(), w_q.t())
    if out_dtype == torch.int32:
        return acc
    return epilogue(acc, row_scale, w_scale, bias, activation, _out_dtype(x, out_dtype))


def _tiles(m: int, n: int, k: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) candidates, the heuristic first: 8 warps and
    64-deep K tiles, which compile for sm_90 without spills (``python -m diffrt.kernels.compile_check``)."""
    if m <= 64:
        return [(64, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4), (32, 128, 64, 8, 4, 4), (64, 256, 64, 8, 8, 3)]
    return [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
            (128, 128, 128, 8, 8, 2)]


def _run_triton(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype):
    from . import int8_triton  # noqa: PLC0415 - triton is imported on first use

    m, k = x.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=_out_dtype(x, out_dtype), device=x.device)

    def launch(tile) -> None:
        int8_triton.launch(x, w_q, w_scale, row_scale, bias, inv_smooth, y, activation, tile)

    if registry.interpreting():
        tile = (32, 32, 32, 4, 4, 1)
    else:
        bucket = 1 << max(0, (m - 1).bit_length())
        key = (str(x.device), x.dtype, y.dtype, bucket, n, k, activation, inv_smooth is not None)
        tile = autotune.choose(OP, key, _tiles(m, n, k), launch, x.device)
    launch(tile)
    return y


registry.add_op(OP, _features)
registry.register(OP, "triton", _run_triton, registry.triton_problem, priority=0, devices=("cuda", "cpu"),
                  auto_devices=("cuda",))
registry.register(OP, "torch", _run_torch, _torch_problem, priority=50)
registry.register(OP, "reference", _run_reference, lambda features: None, priority=100)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, row_scale: torch.Tensor,
                bias: torch.Tensor | None = None, activation: str | None = None,
                inv_smooth: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """y = act((x_q @ w_q^T) * row_scale x w_scale + bias) (module docstring); returns [M, N]."""
    _check(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype)
    chosen = registry.choose_for(OP, _features(x, w_q, w_scale, row_scale), backend)
    return chosen.run(x, w_q, w_scale, row_scale, bias, activation, inv_smooth, out_dtype)
