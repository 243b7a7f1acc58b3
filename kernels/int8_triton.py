"""The Triton INT8 GEMM: int8 x int8 -> int32 on the matrix units, quantizing prologue, fused epilogue.

One program computes a BLOCK_M x BLOCK_N tile of y = x @ w^T (x [M, K], w [N, K] int8, the
nn.Linear layout, K-major as INT8 tensor-core operands need). Over K in steps of BLOCK_K:

    a = x tile                          (int8; or, with QUANTIZE, float: a = clamp(x * inv_smooth *
                                          (1 / row_scale), -127, 127) rounded half to even, to int8)
    acc += tl.dot(a, w_tile^T)          (int32)

then the epilogue: ``y = act((acc * row_scale[m]) * w_scale[n] + bias[n])`` in fp32, stored in
y's dtype (or the raw int32 accumulator with OUT_INT32). Rounding half to even in fp32 uses the
1.5 * 2^23 trick ((v + c) - c with |v| <= 127), which needs no libdevice call and runs the same
under the interpreter. GELU (tanh form) is x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the
same function as 0.5 x (1 + tanh(...)). Programs are ordered in groups of GROUP_M row tiles, so
neighbouring programs share weight tiles in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 half to even
ACT_CODES = {None: 0, "gelu": 1, "silu": 2}


@triton.jit
def int8_linear_kernel(
    X, W, W_SCALE, ROW_SCALE, BIAS, INV_SMOOTH, Y,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    QUANTIZE: tl.constexpr, SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    OUT_INT32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # rows / columns past the end read valid memory (wrapped), their results are never stored: only
    # K needs a mask, which keeps the address arithmetic small (the Triton matmul tutorial's layout)
    safe_rows = rows % M
    safe_cols = cols % N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + safe_rows[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = W + safe_cols[:, None] * stride_wn + ks[None, :] * stride_wk
    row_scale = tl.load(ROW_SCALE + safe_rows)
    if QUANTIZE:
        inv_row = 1.0 / row_scale
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
        if QUANTIZE:
            v = a.to(tl.float32)
            if SMOOTH:
                v = v * tl.load(INV_SMOOTH + k0 + ks, mask=k_ok, other=1.0)[None, :]
            v = v * inv_row[:, None]
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            v = (v + 12582912.0) - 12582912.0
            a = v.to(tl.int8)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    out_ok = row_ok[:, None] & col_ok[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=out_ok)
    else:
        w_scale = tl.load(W_SCALE + cols, mask=col_ok, other=1.0)
        y = (acc.to(tl.float32) * row_scale[:, None]) * w_scale[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
        elif ACT == 2:
            y = y * tl.sigmoid(y)
        tl.store(out_ptrs, y.to(Y.dtype.element_ty), mask=out_ok)


def launch(x, w_q, w_scale, row_scale, bias, inv_smooth, y, activation, tile) -> None:
    """Launch :func:`int8_linear_kernel` (no checks: the launcher made them); ``tile`` =
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)."""
    m, k = x.shape
    n = w_q.shape[0]
    block_m, block_n, block_k, group_m, warps, stages = tile
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    int8_linear_kernel[grid](
        x, w_q, w_scale, row_scale, bias if bias is not None else w_scale,
        inv_smooth if inv_smooth is not None else w_scale, y,
        m, n, k, x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1), y.stride(0), y.stride(1),
        QUANTIZE=x.dtype != torch.int8, SMOOTH=inv_smooth is not None, HAS_BIAS=bias is not None,
        ACT=ACT_CODES[activation], OUT_INT32=y.dtype == torch.int32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages,
    )
