"""The fused solver step: layout of its coefficient table, and its PyTorch reference.

One denoising step of any supported solver is, elementwise over the sample,

    m_c, m_u = cond[i], uncond[i]                       (model outputs; uncond absent: m_u = 0)
    x0       = clamp(pc*m_c + pu*m_u + px*x, lo, hi)    (the data prediction; clamp only where the
                                                         reference scheduler clips)
    o_k      = a_k*x + b_k*x0 + cc_k*m_c + cu_k*m_u + d_k*noise[nidx] + sum_j w_kj * H[j]

for outputs k = 0..n_out-1: o_0 is the next sample, o_k (k >= 1) is written to history slot
``slot_k`` (skipped where slot_k < 0). Classifier-free guidance with scale g folds in as
cc = g*c, cu = (1-g)*c. All arithmetic is fp32; x, history and noise share one storage dtype
(fp32 / fp16 / bf16), cond/uncond may have another. The row is chosen by a device-side step
index, so the step needs no host sync and can be captured in a CUDA graph.

Float table, shape [steps, 5 + n_out*(5 + S)], per row:
    [pc, pu, px, lo, hi,  (a, b, cc, cu, d, w_0 .. w_{S-1}) for each output]
Int table, int32, shape [steps, 1 + n_out]: [noise_index, slot_0 (unused, -1), slot_1, ...].
History: [S, *x.shape]; noise: [n_noise, *x.shape]. All tensors contiguous.
"""
from __future__ import annotations

import torch

X0_COLS = 5
OUT_FIXED_COLS = 5


def out_cols(n_slots: int) -> int:
    """Columns per output in the float table."""
    return OUT_FIXED_COLS + n_slots


def table_width(n_out: int, n_slots: int) -> int:
    """Width of the float table for ``n_out`` outputs and ``n_slots`` history slots."""
    return X0_COLS + n_out * out_cols(n_slots)


def solver_step_reference(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                          history: torch.Tensor | None, noise: torch.Tensor | None,
                          table: torch.Tensor, itable: torch.Tensor, step: torch.Tensor,
                          out: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The spec of the fused step in plain PyTorch (no host sync: the row is picked on the device).

    Returns the next sample (written into ``out`` when given, which may be ``x``); history slots
    are updated in place. ``compute_dtype=torch.float64`` gives the high-precision truth for tests.
    """
    n_slots = 0 if history is None else history.shape[0]
    n_out = itable.shape[1] - 1
    if table.shape[1] != table_width(n_out, n_slots):
        raise ValueError(f"table has {table.shape[1]} columns; {n_out} outputs and {n_slots} slots need {table_width(n_out, n_slots)}")
    row = table.index_select(0, step.reshape(1)).reshape(-1).to(compute_dtype)
    irow = itable.index_select(0, step.reshape(1)).reshape(-1)
    ndim = x.dim()

    def col(i: int) -> torch.Tensor:
        return row[i].reshape((1,) * ndim)

    xc = x.to(compute_dtype)
    mc = cond.to(compute_dtype)
    mu = uncond.to(compute_dtype) if uncond is not None else None
    x0 = col(0) * mc + col(2) * xc
    if mu is not None:
        x0 = x0 + col(1) * mu
    x0 = torch.minimum(torch.maximum(x0, col(3)), col(4))
    x0 = x0.to(x.dtype).to(compute_dtype)  # rounded to the storage dtype, as the reference stores it
    eps = None
    if noise is not None and noise.shape[0] > 0:
        eps = noise.index_select(0, irow[0].clamp(min=0).reshape(1).long())[0].to(compute_dtype)
    hist = None if history is None else history.to(compute_dtype)
    results = []
    for k in range(n_out):
        base = X0_COLS + k * out_cols(n_slots)
        o = col(base) * xc + col(base + 1) * x0 + col(base + 2) * mc
        if mu is not None:
            o = o + col(base + 3) * mu
        if eps is not None:
            o = o + col(base + 4) * eps
        for j in range(n_slots):
            o = o + col(base + 5 + j) * hist[j]
        results.append(o)
    for k in range(1, n_out):
        slot = irow[k + 1].long()
        keep = (slot >= 0).reshape((1,) * ndim)
        target = slot.clamp(min=0).reshape(1)
        current = history.index_select(0, target)[0]
        history.index_copy_(0, target, torch.where(keep, results[k].to(history.dtype), current).unsqueeze(0))
    nxt = results[0].to(x.dtype)
    if out is None:
        return nxt
    out.copy_(nxt)
    return out
