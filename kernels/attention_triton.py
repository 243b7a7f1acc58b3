"""The Triton attention kernel: flash attention forward with ToDo and block sparsity inside.

One program computes a BLOCK_M x Dv tile of the output for one (batch, head): it loads its query
tile once, then visits key/value tiles of BLOCK_N tokens (all of them, or only the active ones
listed by the block mask's ``kv_index`` / ``kv_count``), with an online softmax in fp32:

    s    = (q k^T) * scale * log2(e)              (tl.dot, fp32 accumulate; keys past Lk: -inf)
    m'   = max(m, rowmax(s));  p = exp2(s - m');  alpha = exp2(m - m')
    l    = l * alpha + rowsum(p);  acc = acc * alpha + p v     (p rounded to v's dtype for the dot)
    o    = acc / l   (0 where l = 0: a row whose keys are all masked)

ToDo: with ``MODE`` 1 (nearest) key j of the downsampled grid (row j // down_w, column
j % down_w) is read at token (row*F) * grid_w + column*F; with ``MODE`` 2 (average) the kernel
reads the F x F cell, averages it in fp32 and rounds the mean to the input dtype. No pooled copy
of K or V is written.

Head dims that are not a power of two are split in two power-of-two column chunks
(D1 = the largest power of two <= D, D2 = the rest rounded up to a power of two >= 16), so a head
dim of 72 computes 64 + 16 columns, not 128. q, k, v and o take any strides.

The launcher (:mod:`diffrt.kernels.attention_launch`) picks tiles and warps; this module holds
only the kernel and its tile arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(D1, D2): the column chunks for a head dim (D2 = 0 when D is a power of two >= 16)."""
    if head_dim <= 16:
        return 16, 0
    d1 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d1
    if rest == 0:
        return d1, 0
    d2 = max(16, 1 << (rest - 1).bit_length())
    if d2 >= d1:  # e.g. 24 = 16 + 8 -> one chunk of 32 is no worse
        return 2 * d1, 0
    return d1, d2


@triton.jit
def _kv_tile(base, offs_n, valid_n, cols, stride_l, stride_d, head_dim, grid_h, grid_w, down_w,
             MODE: tl.constexpr, FACTOR: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr):
    """Keys or values of downsampled tokens offs_n [BLOCK_N], columns cols [C] -> [BLOCK_N, C]."""
    col_ok = cols[None, :] < head_dim
    if MODE == 0:
        ptrs = base + offs_n[:, None] * stride_l + cols[None, :] * stride_d
        tile = tl.load(ptrs, mask=valid_n[:, None] & col_ok, other=0.0)
    else:
        row = (offs_n // down_w) * FACTOR
        col = (offs_n % down_w) * FACTOR
        if MODE == 1:
            ptrs = base + (row * grid_w + col)[:, None] * stride_l + cols[None, :] * stride_d
            tile = tl.load(ptrs, mask=valid_n[:, None] & col_ok, other=0.0)
        else:
            total = tl.zeros([BLOCK_N, COLS], dtype=tl.float32)
            count = tl.zeros([BLOCK_N], dtype=tl.float32)
            for dy in tl.static_range(FACTOR):
                for dx in tl.static_range(FACTOR):
                    ok = valid_n & (row + dy < grid_h) & (col + dx < grid_w)
                    ptrs = base + ((row + dy) * grid_w + col + dx)[:, None] * stride_l + cols[None, :] * stride_d
                    total += tl.load(ptrs, mask=ok[:, None] & col_ok, other=0.0).to(tl.float32)
                    count += ok.to(tl.float32)
            tile = (total / tl.maximum(count, 1.0)[:, None]).to(base.dtype.element_ty)
    return tile


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_FP32 upcasts the operands; IEEE keeps fp32 operands off TF32."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def attention_kernel(
    Q, K, V, O, KV_INDEX, KV_COUNT,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
    heads, q_len, k_len, grid_h, grid_w, down_w, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr,
    VALUE_DIM: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, V2P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, FACTOR: tl.constexpr,
    SPARSE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    cols1 = tl.arange(0, D1)
    q1 = tl.load(q_base + offs_m[:, None] * stride_ql + cols1[None, :] * stride_qd,
                 mask=row_ok[:, None] & (cols1[None, :] < HEAD_DIM), other=0.0)
    cols2 = D1 + tl.arange(0, D2P)
    if D2 > 0:
        q2 = tl.load(q_base + offs_m[:, None] * stride_ql + cols2[None, :] * stride_qd,
                     mask=row_ok[:, None] & (cols2[None, :] < HEAD_DIM), other=0.0)
    vcols1 = tl.arange(0, V1)
    vcols2 = V1 + tl.arange(0, V2P)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, V1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, V2P], dtype=tl.float32)

    if SPARSE:
        n_blocks = tl.load(KV_COUNT + b * stride_cb + h * stride_ch + pid_m * stride_cq)
    else:
        n_blocks = tl.cdiv(k_len, BLOCK_N)
    for i in range(0, n_blocks):
        if SPARSE:
            block = tl.load(KV_INDEX + b * stride_ib + h * stride_ih + pid_m * stride_iq + i)
        else:
            block = i
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < k_len
        k1 = _kv_tile(k_base, offs_n, valid_n, cols1, stride_kl, stride_kd, HEAD_DIM, grid_h, grid_w, down_w,
                      MODE, FACTOR, BLOCK_N, D1)
        s = _dot(q1, tl.trans(k1), DOT_FP32, IEEE)
        if D2 > 0:
            k2 = _kv_tile(k_base, offs_n, valid_n, cols2, stride_kl, stride_kd, HEAD_DIM, grid_h, grid_w, down_w,
                          MODE, FACTOR, BLOCK_N, D2P)
            s += _dot(q2, tl.trans(k2), DOT_FP32, IEEE)
        s = tl.where(valid_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v1 = _kv_tile(v_base, offs_n, valid_n, vcols1, stride_vl, stride_vd, VALUE_DIM, grid_h, grid_w, down_w,
                      MODE, FACTOR, BLOCK_N, V1)
        p_low = p.to(v1.dtype)
        acc1 = acc1 * alpha[:, None] + _dot(p_low, v1, DOT_FP32, IEEE)
        if V2 > 0:
            v2 = _kv_tile(v_base, offs_n, valid_n, vcols2, stride_vl, stride_vd, VALUE_DIM, grid_h, grid_w, down_w,
                          MODE, FACTOR, BLOCK_N, V2P)
            acc2 = acc2 * alpha[:, None] + _dot(p_low, v2, DOT_FP32, IEEE)

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # l = 0 only where acc = 0: those rows come out 0
    o_base = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol
    out_ty = O.dtype.element_ty
    tl.store(o_base + vcols1[None, :] * stride_od, (acc1 * inv_l[:, None]).to(out_ty),
             mask=row_ok[:, None] & (vcols1[None, :] < VALUE_DIM))
    if V2 > 0:
        tl.store(o_base + vcols2[None, :] * stride_od, (acc2 * inv_l[:, None]).to(out_ty),
                 mask=row_ok[:, None] & (vcols2[None, :] < VALUE_DIM))


def launch(q, k, v, out, kv_index, kv_count, index_strides, count_strides, scale: float, down: tuple,
           block_m: int, block_n: int, num_warps: int, num_stages: int, dot_fp32: bool) -> None:
    """Launch :func:`attention_kernel` (no checks: the launcher has made them).

    ``down`` = (mode code 0/1/2, factor, grid_h, grid_w, down_w); ``kv_index`` / ``kv_count`` are
    None for dense attention (any tensor is passed in their place; the kernel does not read it).
    """
    batch, q_len, heads, head_dim = q.shape
    value_dim = v.shape[3]
    mode, factor, grid_h, grid_w, down_w = down
    k_len = k.shape[1] if mode == 0 else (-(-grid_h // factor)) * down_w
    d1, d2 = head_dim_chunks(head_dim)
    v1, v2 = head_dim_chunks(value_dim)
    sparse = kv_index is not None
    index = kv_index if sparse else q
    count = kv_count if sparse else q
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    attention_kernel[grid](
        q, k, v, out, index, count,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *index_strides, *count_strides,
        heads, q_len, k_len, grid_h, grid_w, down_w, scale * LOG2E,
        HEAD_DIM=head_dim, D1=d1, D2=d2, D2P=max(d2, 16), VALUE_DIM=value_dim, V1=v1, V2=v2, V2P=max(v2, 16),
        BLOCK_M=block_m, BLOCK_N=block_n, MODE=mode, FACTOR=factor, SPARSE=sparse, DOT_FP32=dot_fp32,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
