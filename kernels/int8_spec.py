"""W8A8 linear algebra: symmetric INT8 quantization and the INT8 linear, in plain PyTorch (the spec).

Symmetric INT8 in [-127, 127] (-128 is never produced, so negation is exact):

    quantize(v, s)  = clamp(rint(v / s), -127, 127)              (rint: round half to even)

computed in fp32 as ``v * (1 / s)`` (one reciprocal per scale, as the kernels do).

The INT8 linear of activations x [M, K] and a quantized weight (w_q int8 [N, K], w_scale fp32 [N],
per output channel, ``quantize_weight``) with per-row activation scales ``row_scale`` fp32 [M]:

    x_q[m, k] = quantize(x[m, k] * inv_smooth[k], row_scale[m])  (inv_smooth: SmoothQuant, else 1)
    acc       = x_q @ w_q^T                                        (int32, exact: |acc| <= 127^2 K)
    y[m, n]   = act((acc[m, n] * row_scale[m]) * w_scale[n] + bias[n])      (fp32, then out dtype)

``act``: None, "gelu" (tanh approximation) or "silu". Rows are tokens: all tokens of one sample
share that sample's scale, chosen from its timestep group (per-sample scales), or each token
gets its own (dynamic per-token quantization: ``row_scale = max_k |x[m, k]| / 127``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = 127
ACTIVATIONS = (None, "gelu", "silu")


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 of ``x`` [..., K] with ``scale`` broadcast against it: clamp(rint(x * (1/scale)), -127, 127)."""
    inv = 1.0 / scale.to(torch.float32)
    return torch.clamp(torch.round(x.to(torch.float32) * inv), -QMAX, QMAX).to(torch.int8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q int8 [N, K], w_scale fp32 [N]) of a weight [N, K]: per output channel, scale = max|w| / 127.

    An all-zero row gets scale 1 (its codes are 0).
    """
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return quantize(w, scale[:, None]), scale


def dynamic_row_scale(x: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token scales fp32 [M] of x [M, K]: max_k |x * inv_smooth| / 127 (rows of zeros: 1)."""
    v = x.to(torch.float32)
    if inv_smooth is not None:
        v = v * inv_smooth.to(torch.float32)
    scale = v.abs().amax(dim=1) / QMAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int8_accumulate(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q int8 [M, K] @ w_q int8 [N, K]^T -> int32 [M, N], exactly (int64 arithmetic)."""
    return (x_q.to(torch.int64) @ w_q.to(torch.int64).T).to(torch.int32)


def epilogue(acc: torch.Tensor, row_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             activation: str | None, out_dtype: torch.dtype) -> torch.Tensor:
    """act((acc * row_scale[:, None]) * w_scale[None, :] + bias) in fp32, cast to ``out_dtype``."""
    y = (acc.to(torch.float32) * row_scale.to(torch.float32)[:, None]) * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    if activation == "gelu":
        y = F.gelu(y, approximate="tanh")
    elif activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y.to(out_dtype)


def int8_linear_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, row_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, activation: str | None = None,
                          inv_smooth: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The spec (module docstring): x [M, K] float (quantized here) or int8 (already quantized) -> [M, N].

    ``out_dtype`` defaults to x's dtype (float32 for int8 x); ``torch.int32`` returns the raw accumulator.
    """
    if x.dtype == torch.int8:
        x_q = x
    else:
        v = x.to(torch.float32) if inv_smooth is None else x.to(torch.float32) * inv_smooth.to(torch.float32)
        x_q = quantize(v, row_scale[:, None])
    acc = int8_accumulate(x_q, w_q)
    if out_dtype == torch.int32:
        return acc
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    return epilogue(acc, row_scale, w_scale, bias, activation, out_dtype)

