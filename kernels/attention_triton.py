"""The Triton attention kernel: flash attention forward with ToDo and block sparsity inside.

One program computes a BLOCK_M x Dv tile of the output for one (batch, head): it loads its query
tile once, then visits key/value tiles of BLOCK_N tokens (all of them, or only the active ones
listed by the block mask's ``kv_index`` / ``kv_count``), with an online softmax in fp32
(c = |scale| * log2(e); q is negated first when the scale is negative, which is exact):

    s    = q k^T                                   (tl.dot, fp32 accumulate)
    m'   = max(m, rowmax(s) * c);  p = exp2(s * c - m')  (one fused multiply-add per score)
    alpha = exp2(m - m');  l = l * alpha + rowsum(p)
    acc  = p v + acc * alpha                       (the dot accumulates into the rescaled acc;
                                                    p rounded to v's dtype for the dot)
    o    = acc / l   (0 where l = 0: a row whose keys are all masked)

The loop is split: every key tile but the last is full (the last listed one for a block mask, the
tile holding key Lk - 1 otherwise), so only the last one masks keys past Lk (scores -inf, loads
masked); the others load without row masks and pipeline.

ToDo: with ``MODE`` 1 (nearest) key j of the downsampled grid (row j // down_w, column
j % down_w) is read at token (row*F) * grid_w + column*F; with ``MODE`` 2 (average) the kernel
reads the F x F cell, averages it in fp32 and rounds the mean to the input dtype. No pooled copy
of K or V is written.

Head dims that are not a power of two are split in two power-of-two column chunks
(D1 = the largest power of two <= D, D2 = the rest rounded up to a power of two >= 16), so a head
dim of 72 computes 64 + 16 columns, not 128. q, k, v and o take any strides; ``ALIGN`` (elements)
divides every batch, token and head stride (:func:`stride_alignment`), so head dims of 8 mod 16
(40, 72) still get 16-byte vector loads and asynchronous copies.

Two ways to read K and V: pointers (any strides, every mode) or, with ``TMA`` (Hopper; dense keys
or ToDo nearest, :func:`tma_reads`), host-built tensor descriptors whose boxes of BLOCK_N keys x
one column chunk are copied by the TMA unit (rows past Lk and columns past D read as 0).

The launcher (:mod:`diffrt.kernels.attention_launch`) picks tiles and warps; this module holds
only the kernel and its tile arithmetic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
VECTOR_BYTES = 16  # one 16-byte copy: what cp.async and the TMA unit want per row


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


def stride_alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two, at most 16 bytes' worth of elements, dividing every batch, token
    and head stride of ``tensors`` ([B, L, H, D]): the kernel's ``ALIGN`` hint."""
    common = 0
    for tensor in tensors:
        for stride in tensor.stride()[:3]:
            common = math.gcd(common, stride)
    align = VECTOR_BYTES // tensors[0].element_size()
    while align > 1 and common % align:
        align //= 2
    return align


def tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can read ``tensors`` ([B, L, H, D]): last dim contiguous, base
    and every other stride 16-byte aligned (the TMA unit's rules)."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.stride(3) != 1 or tensor.data_ptr() % VECTOR_BYTES:
            return False
        if any(stride * size % VECTOR_BYTES for stride in tensor.stride()[:3]):
            return False
    return True


def tma_reads(k: torch.Tensor, v: torch.Tensor, down: tuple) -> bool:
    """Whether the TMA variant can read these keys / values: :func:`tma_layout_ok`, and dense keys
    or ToDo nearest with a power-of-two downsampled width (a tile of keys is then a box of whole
    downsampled rows, or a piece of one)."""
    mode, _, _, _, down_w = down
    return tma_layout_ok(k, v) and (mode == 0 or (mode == 1 and down_w & (down_w - 1) == 0))


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """tl.load with ``mask`` (masked-out elements read as 0) or, when not MASKED, with no mask at all."""
    if MASKED:
        values = tl.load(ptrs, mask=mask, other=0.0)
    else:
        values = tl.load(ptrs)
    return values


@triton.jit
def _average_tile(base, row, col, cols, col_ok, valid_n, stride_l, stride_d, grid_h, grid_w,
                  FACTOR: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr, MASK_N: tl.constexpr,
                  COL_MASK: tl.constexpr):
    """ToDo average: the mean (fp32, rounded to the input dtype) of the F x F cells at grid (row, col)."""
    total = tl.zeros([BLOCK_N, COLS], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    for dy in tl.static_range(FACTOR):
        for dx in tl.static_range(FACTOR):
            ok = (row + dy < grid_h) & (col + dx < grid_w)
            if MASK_N:
                ok = ok & valid_n
            ptrs = base + ((row + dy) * grid_w + col + dx)[:, None] * stride_l + cols[None, :] * stride_d
            cell_mask = ok[:, None] & col_ok if COL_MASK else ok[:, None]
            total += tl.load(ptrs, mask=cell_mask, other=0.0).to(tl.float32)
            count += ok.to(tl.float32)
    return (total / tl.maximum(count, 1.0)[:, None]).to(base.dtype.element_ty)


@triton.jit
def _kv_tile(base, desc, b, h, n0, valid_n, stride_l, stride_d, grid_h, grid_w, down_w,
             DIM: tl.constexpr, START: tl.constexpr, COLS: tl.constexpr, MODE: tl.constexpr,
             FACTOR: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, TMA: tl.constexpr):
    """Keys or values of downsampled tokens n0 .. n0 + BLOCK_N, columns START .. START + COLS ->
    [BLOCK_N, COLS]; rows masked (read as 0) only with MASK_N, columns only past DIM."""
    if TMA:
        if MODE == 0:
            tile = desc.load([b, n0, h, START]).reshape(BLOCK_N, COLS)
        else:
            tile = desc.load([b, n0 // down_w, n0 % down_w, h, START]).reshape(BLOCK_N, COLS)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = START + tl.arange(0, COLS)
        col_ok = cols[None, :] < DIM
        mask = col_ok & valid_n[:, None] if MASK_N else col_ok
        if MODE == 0:
            tile = _load(base + offs_n[:, None] * stride_l + cols[None, :] * stride_d, mask,
                         MASK_N or START + COLS > DIM)
        else:
            row = (offs_n // down_w) * FACTOR
            col = (offs_n % down_w) * FACTOR
            if MODE == 1:
                tile = _load(base + (row * grid_w + col)[:, None] * stride_l + cols[None, :] * stride_d, mask,
                             MASK_N or START + COLS > DIM)
            else:
                tile = _average_tile(base, row, col, cols, col_ok, valid_n, stride_l, stride_d, grid_h, grid_w,
                                     FACTOR, BLOCK_N, COLS, MASK_N, START + COLS > DIM)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b in fp32; DOT_FP32 upcasts the operands; IEEE keeps fp32 operands off TF32."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _attend(acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, k_desc1, k_desc2, v_desc1, v_desc2, b, h, n0, k_len,
            stride_kl, stride_kd, stride_vl, stride_vd, grid_h, grid_w, down_w, qk_scale,
            HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr,
            VALUE_DIM: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, V2P: tl.constexpr,
            BLOCK_N: tl.constexpr, MODE: tl.constexpr, FACTOR: tl.constexpr, DOT_FP32: tl.constexpr,
            IEEE: tl.constexpr, TMA: tl.constexpr, MASK_N: tl.constexpr):
    """One key/value tile (keys n0 .. n0 + BLOCK_N) folded into the online softmax (module docstring)."""
    valid_n = (n0 + tl.arange(0, BLOCK_N)) < k_len
    k1 = _kv_tile(k_base, k_desc1, b, h, n0, valid_n, stride_kl, stride_kd, grid_h, grid_w, down_w,
                  HEAD_DIM, 0, D1, MODE, FACTOR, BLOCK_N, MASK_N, TMA)
    s = _dot(q1, tl.trans(k1), tl.zeros([q1.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, IEEE)
    if D2 > 0:
        k2 = _kv_tile(k_base, k_desc2, b, h, n0, valid_n, stride_kl, stride_kd, grid_h, grid_w, down_w,
                      HEAD_DIM, D1, D2P, MODE, FACTOR, BLOCK_N, MASK_N, TMA)
        s = _dot(q2, tl.trans(k2), s, DOT_FP32, IEEE)
    if MASK_N:  # the last tile: at least one key is valid, so m' is finite
        s = tl.where(valid_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v1 = _kv_tile(v_base, v_desc1, b, h, n0, valid_n, stride_vl, stride_vd, grid_h, grid_w, down_w,
                  VALUE_DIM, 0, V1, MODE, FACTOR, BLOCK_N, MASK_N, TMA)
    p_low = p.to(v1.dtype)
    acc1 = _dot(p_low, v1, acc1 * alpha[:, None], DOT_FP32, IEEE)
    if V2 > 0:
        v2 = _kv_tile(v_base, v_desc2, b, h, n0, valid_n, stride_vl, stride_vd, grid_h, grid_w, down_w,
                      VALUE_DIM, V1, V2P, MODE, FACTOR, BLOCK_N, MASK_N, TMA)
        acc2 = _dot(p_low, v2, acc2 * alpha[:, None], DOT_FP32, IEEE)
    return acc1, acc2, m_new, l_i


@triton.jit
def attention_kernel(
    Q, K, V, O, KV_INDEX, KV_COUNT, K_DESC1, K_DESC2, V_DESC1, V_DESC2,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
    heads, q_len, k_len, grid_h, grid_w, down_w, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr,
    VALUE_DIM: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, V2P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, FACTOR: tl.constexpr,
    SPARSE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, NEGATE_Q: tl.constexpr,
    ALIGN: tl.constexpr, TMA: tl.constexpr, Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q_offset = b * stride_qb + h * stride_qh
    k_offset = b * stride_kb + h * stride_kh
    v_offset = b * stride_vb + h * stride_vh
    o_offset = b * stride_ob + h * stride_oh
    if ALIGN > 1:  # every batch, token and head stride is a multiple of ALIGN elements (stride_alignment)
        q_offset = tl.multiple_of(q_offset, ALIGN)
        k_offset = tl.multiple_of(k_offset, ALIGN)
        v_offset = tl.multiple_of(v_offset, ALIGN)
        o_offset = tl.multiple_of(o_offset, ALIGN)
        stride_ql = tl.multiple_of(stride_ql, ALIGN)
        stride_kl = tl.multiple_of(stride_kl, ALIGN)
        stride_vl = tl.multiple_of(stride_vl, ALIGN)
        stride_ol = tl.multiple_of(stride_ol, ALIGN)
    q_base, k_base, v_base = Q + q_offset, K + k_offset, V + v_offset

    cols1 = tl.arange(0, D1)
    q1 = tl.load(q_base + offs_m[:, None] * stride_ql + cols1[None, :] * stride_qd,
                 mask=row_ok[:, None] & (cols1[None, :] < HEAD_DIM), other=0.0)
    cols2 = D1 + tl.arange(0, D2P)
    q2 = q1
    if D2 > 0:
        q2 = tl.load(q_base + offs_m[:, None] * stride_ql + cols2[None, :] * stride_qd,
                     mask=row_ok[:, None] & (cols2[None, :] < HEAD_DIM), other=0.0)
    if NEGATE_Q:  # a negative scale: s * scale = (-s) * |scale|, exactly
        q1 = -q1
        q2 = -q2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, V1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, V2P], dtype=tl.float32)

    mask_row = pid_m // Q_SPLIT  # the block mask's query block
    index_row = KV_INDEX + b * stride_ib + h * stride_ih + mask_row * stride_iq
    if SPARSE:
        n_blocks = tl.load(KV_COUNT + b * stride_cb + h * stride_ch + mask_row * stride_cq)
        n_full = tl.maximum(n_blocks - 1, 0)  # listed in ascending order: only the last can be ragged
    else:
        n_blocks = tl.cdiv(k_len, BLOCK_N)
        n_full = k_len // BLOCK_N
    for i in range(n_full * K_SPLIT):  # a mask's key block is K_SPLIT key tiles
        block = tl.load(index_row + i // K_SPLIT) * K_SPLIT + i % K_SPLIT if SPARSE else i
        acc1, acc2, m_i, l_i = _attend(
            acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, K_DESC1, K_DESC2, V_DESC1, V_DESC2, b, h,
            block * BLOCK_N, k_len, stride_kl, stride_kd, stride_vl, stride_vd, grid_h, grid_w, down_w, qk_scale,
            HEAD_DIM, D1, D2, D2P, VALUE_DIM, V1, V2, V2P, BLOCK_N, MODE, FACTOR, DOT_FP32, IEEE, TMA, False)
    if n_full < n_blocks:  # the last (ragged) block, masked: its first key tile holds a key, so m_i is finite after it
        for j in tl.static_range(K_SPLIT):
            block = tl.load(index_row + n_full) * K_SPLIT + j if SPARSE else n_full
            acc1, acc2, m_i, l_i = _attend(
                acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, K_DESC1, K_DESC2, V_DESC1, V_DESC2, b, h,
                block * BLOCK_N, k_len, stride_kl, stride_kd, stride_vl, stride_vd, grid_h, grid_w, down_w, qk_scale,
                HEAD_DIM, D1, D2, D2P, VALUE_DIM, V1, V2, V2P, BLOCK_N, MODE, FACTOR, DOT_FP32, IEEE, TMA, True)

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # l = 0 only where acc = 0: those rows come out 0
    o_base = O + o_offset + offs_m[:, None] * stride_ol
    out_ty = O.dtype.element_ty
    vcols1 = tl.arange(0, V1)
    tl.store(o_base + vcols1[None, :] * stride_od, (acc1 * inv_l[:, None]).to(out_ty),
             mask=row_ok[:, None] & (vcols1[None, :] < VALUE_DIM))
    if V2 > 0:
        vcols2 = V1 + tl.arange(0, V2P)
        tl.store(o_base + vcols2[None, :] * stride_od, (acc2 * inv_l[:, None]).to(out_ty),
                 mask=row_ok[:, None] & (vcols2[None, :] < VALUE_DIM))


def _descriptors(t: torch.Tensor, block_n: int, dim: int, down: tuple) -> tuple:
    """Tensor descriptors over t [B, L, H, D] for the kernel's two column chunks.

    Dense keys: t itself, boxes [1, block_n, 1, chunk]. ToDo nearest: the strided view
    [B, ceil(h / f), w', H, D] of the picked tokens (w' = ``down_w``, a power of two), boxes
    [1, block_n / w', w', 1, chunk] (or [1, 1, block_n, 1, chunk] when w' >= block_n), so a box
    holds downsampled keys n0 .. n0 + block_n in order.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    mode, factor, grid_h, grid_w, down_w = down
    batch, _, heads, _ = t.shape
    if mode == 0:
        shape, strides, box = list(t.shape), list(t.stride()), [1, block_n, 1]
    else:
        stride_b, stride_l, stride_h, stride_d = t.stride()
        shape = [batch, -(-grid_h // factor), down_w, heads, dim]
        strides = [stride_b, factor * grid_w * stride_l, factor * stride_l, stride_h, stride_d]
        box = [1, max(1, block_n // down_w), min(block_n, down_w), 1]
    d1, d2 = head_dim_chunks(dim)
    first = TensorDescriptor(t, shape, strides, box + [d1])
    if d2 == 0:
        return first, first
    return first, TensorDescriptor(t, shape, strides, box + [max(d2, 16)])


def launch(q, k, v, out, kv_index, kv_count, index_strides, count_strides, scale: float, down: tuple,
           block_m: int, block_n: int, num_warps: int, num_stages: int, dot_fp32: bool, tma: bool = False,
           q_split: int = 1, k_split: int = 1) -> None:
    """Launch :func:`attention_kernel` (no checks: the launcher has made them).

    ``down`` = (mode code 0/1/2, factor, grid_h, grid_w, down_w); ``kv_index`` / ``kv_count`` are
    None for dense attention (any tensor is passed in their place; the kernel does not read it).
    ``tma``: read K and V through tensor descriptors (:func:`tma_reads` holds). ``q_split``: a block
    mask's query block is ``q_split`` programs of ``block_m`` rows (they read its row of the tables).
    """
    batch, q_len, heads, head_dim = q.shape
    value_dim = v.shape[3]
    mode, factor, grid_h, grid_w, down_w = down
    if tma and not tma_reads(k, v, down):
        raise ValueError(f"attention kernel: tensor descriptors cannot read k {tuple(k.shape)} strides {k.stride()}, "
                         f"v strides {v.stride()} with ToDo {down} (dense or nearest with a power-of-two width, "
                         "16-byte aligned)")
    k_len = k.shape[1] if mode == 0 else (-(-grid_h // factor)) * down_w
    d1, d2 = head_dim_chunks(head_dim)
    v1, v2 = head_dim_chunks(value_dim)
    sparse = kv_index is not None
    index = kv_index if sparse else q
    count = kv_count if sparse else q
    k_descs = _descriptors(k, block_n, head_dim, down) if tma else (None, None)
    v_descs = _descriptors(v, block_n, value_dim, down) if tma else (None, None)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    attention_kernel[grid](
        q, k, v, out, index, count, *k_descs, *v_descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *index_strides, *count_strides,
        heads, q_len, k_len, grid_h, grid_w, down_w, abs(scale) * LOG2E,
        HEAD_DIM=head_dim, D1=d1, D2=d2, D2P=max(d2, 16), VALUE_DIM=value_dim, V1=v1, V2=v2, V2P=max(v2, 16),
        BLOCK_M=block_m, BLOCK_N=block_n, MODE=mode, FACTOR=factor, SPARSE=sparse, DOT_FP32=dot_fp32,
        IEEE=q.dtype == torch.float32, NEGATE_Q=scale < 0, ALIGN=stride_alignment(q, k, v, out), TMA=tma,
        Q_SPLIT=q_split, K_SPLIT=k_split,
        num_warps=num_warps, num_stages=num_stages,
    )
