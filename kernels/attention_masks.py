"""Block-mask builders for :func:`diffrt.kernels.attention` (all return a :class:`BlockMask`).

Tokens lie on a row-major grid: 2-D (h, w) for images (token index y*w + x), 3-D (t, h, w) for
video (index (f*h + y)*w + x). A block is ``q_block`` consecutive query tokens or ``k_block``
consecutive key tokens; a block pair is active when any token pair in it is allowed, so the
masks are exact at block granularity (the kernel then attends every token of an active block).

* :func:`local_window` (2-D or 3-D): query token i attends key token j iff
  |coord_i - coord_j| <= radius on every axis (coordinates of the query and key grids, which
  may differ in size: keys downsampled by f sit at f times their grid position);
* :func:`global_tokens`: key blocks holding given tokens are attended by every query block, and
  query blocks holding given tokens attend every key block (union with ``base``);
* :func:`dynamic` (SpargeAttn-style): from mean-pooled Q and K blocks, per query block keep the
  most probable key blocks until their pooled softmax mass reaches ``tau`` (or the top ``topk``
  fraction); blocks whose tokens are not self-similar (mean pairwise cosine < ``min_similarity``)
  cannot be judged by their mean, so their whole row (query) or column (key) stays dense.
* :func:`union`, :func:`dense`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .attention_spec import BlockMask

# Token pairs evaluated at once when building window masks (bounds the builder's memory).
_CHUNK_PAIRS = 1 << 24


def _blocks(length: int, block: int) -> int:
    return -(-length // block)


def dense(q_len: int, k_len: int, q_block: int = 64, k_block: int = 64, device=None) -> BlockMask:
    """Every block pair active."""
    active = torch.ones(1, 1, _blocks(q_len, q_block), _blocks(k_len, k_block), dtype=torch.bool, device=device)
    return BlockMask(active, q_block, k_block, q_len, k_len)


def _coords(grid: Sequence[int], stride: Sequence[int], device) -> torch.Tensor:
    """Coordinates [prod(grid), len(grid)] of a row-major grid, each axis scaled by its stride."""
    axes = [torch.arange(n, device=device) * s for n, s in zip(grid, stride)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def local_window(grid: Sequence[int], radius: int | Sequence[int], q_block: int = 64, k_block: int = 64,
                 k_grid: Sequence[int] | None = None, device=None) -> BlockMask:
    """Local attention on a 2-D (h, w) or 3-D (t, h, w) token grid at block granularity.

    ``radius``: one int for every axis or one per axis (in query-grid units). ``k_grid``: the key
    grid when it differs (ToDo-downsampled keys: each axis a ceil-division of the query grid by the
    same factor f; key position p sits at p * f).
    """
    grid = tuple(int(n) for n in grid)
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise ValueError(f"local_window: grid must be (h, w) or (t, h, w) with sizes >= 1, got {grid}")
    radii = (radius,) * len(grid) if isinstance(radius, int) else tuple(radius)
    if len(radii) != len(grid) or min(radii) < 0:
        raise ValueError(f"local_window: radius must be >= 0, one value or one per axis of {grid}, got {radius}")
    k_grid = grid if k_grid is None else tuple(int(n) for n in k_grid)
    if len(k_grid) != len(grid):
        raise ValueError(f"local_window: k_grid {k_grid} and grid {grid} need the same number of axes")
    stride = [max(1, round(n / m)) for n, m in zip(grid, k_grid)]
    q_pos, k_pos = _coords(grid, [1] * len(grid), device), _coords(k_grid, stride, device)
    limit = torch.tensor(radii, device=device)
    q_len, k_len = len(q_pos), len(k_pos)
    n_q, n_k = _blocks(q_len, q_block), _blocks(k_len, k_block)
    active = torch.zeros(n_q, n_k, dtype=torch.bool, device=device)
    k_pad = n_k * k_block - k_len
    rows_per_chunk = max(1, _CHUNK_PAIRS // max(1, k_len * q_block))
    for first in range(0, n_q, rows_per_chunk):
        last = min(n_q, first + rows_per_chunk)
        q_chunk = q_pos[first * q_block: last * q_block]
        allowed = ((q_chunk[:, None, :] - k_pos[None, :, :]).abs() <= limit).all(dim=-1)  # [tokens, k_len]
        allowed = torch.nn.functional.pad(allowed, (0, k_pad))
        pad_rows = (last - first) * q_block - len(q_chunk)
        allowed = torch.nn.functional.pad(allowed, (0, 0, 0, pad_rows))
        active[first:last] = allowed.reshape(last - first, q_block, n_k, k_block).any(dim=3).any(dim=1)
    return BlockMask(active[None, None], q_block, k_block, q_len, k_len)


def global_tokens(tokens: Sequence[int] | torch.Tensor, q_len: int, k_len: int, q_block: int = 64,
                  k_block: int = 64, base: BlockMask | None = None, queries: bool = True) -> BlockMask:
    """Make ``tokens`` global: every query block attends the key blocks holding them, and (with
    ``queries``) the query blocks holding them attend every key block; added to ``base``."""
    index = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if index.numel() and (index.min() < 0 or index.max() >= max(q_len, k_len)):
        raise ValueError(f"global_tokens: token indices must be in 0..{max(q_len, k_len) - 1}")
    mask = base if base is not None else BlockMask(
        torch.zeros(1, 1, _blocks(q_len, q_block), _blocks(k_len, k_block), dtype=torch.bool), q_block, k_block,
        q_len, k_len)
    if (mask.q_len, mask.k_len, mask.q_block, mask.k_block) != (q_len, k_len, q_block, k_block):
        raise ValueError("global_tokens: base was built for other lengths or block sizes")
    active = mask.active.clone()
    key_blocks = torch.unique(index[index < k_len] // k_block).to(active.device)
    active[..., key_blocks] = True
    if queries:
        query_blocks = torch.unique(index[index < q_len] // q_block).to(active.device)
        active[:, :, query_blocks, :] = True
    return BlockMask(active, q_block, k_block, q_len, k_len)


def union(*masks: BlockMask) -> BlockMask:
    """Block pairs active in any of ``masks`` (same lengths and block sizes; batch / head dims broadcast)."""
    first = masks[0]
    for other in masks[1:]:
        if (other.q_len, other.k_len, other.q_block, other.k_block) != (first.q_len, first.k_len, first.q_block,
                                                                         first.k_block):
            raise ValueError("union: masks must share lengths and block sizes")
    active = first.active
    for other in masks[1:]:
        active = active | other.active.to(active.device)
    return BlockMask(active.contiguous(), first.q_block, first.k_block, first.q_len, first.k_len)


def _pool_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of tokens of x [B, L, H, D]: (mean [B, H, n, D], mean pairwise cosine [B, H, n]), fp32.

    The mean pairwise cosine of a block's tokens (self pairs included) is ||sum_i x_i/|x_i| ||^2 / n^2.
    """
    batch, length, heads, dim = x.shape
    n = _blocks(length, block)
    pad = n * block - length
    xf = x.float().permute(0, 2, 1, 3)  # [B, H, L, D]
    valid = torch.ones(length, device=x.device)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    xf = xf.reshape(batch, heads, n, block, dim)
    count = valid.reshape(n, block).sum(dim=1)  # [n]
    mean = xf.sum(dim=3) / count[:, None]
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit.sum(dim=3).square().sum(dim=-1) / count.square()
    return mean, similarity


def dynamic(q: torch.Tensor, k: torch.Tensor, q_block: int = 128, k_block: int = 64, tau: float | None = 0.98,
            topk: float | None = None, min_similarity: float = 0.5, scale: float | None = None) -> BlockMask:
    """SpargeAttn-style selection per (batch, head) from q [B, Lq, H, D], k [B, Lk, H, D] (module docstring).

    Pooled scores s = softmax_j(scale * <mean q block i, mean k block j>). With ``tau``: per query
    block the fewest key blocks, by descending s, whose s sum to >= tau. With ``topk`` (a fraction
    in (0, 1]): the ceil(topk * nkb) highest. At least one block per row is kept. Then rows of
    query blocks and columns of key blocks with mean pairwise cosine < ``min_similarity`` are
    made dense. Returns a mask [B, H, nqb, nkb].
    """
    if (tau is None) == (topk is None):
        raise ValueError("dynamic: give exactly one of tau (cumulative probability) or topk (a fraction)")
    if tau is not None and not 0 < tau <= 1:
        raise ValueError(f"dynamic: tau must be in (0, 1], got {tau}")
    if topk is not None and not 0 < topk <= 1:
        raise ValueError(f"dynamic: topk must be a fraction in (0, 1], got {topk}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"dynamic: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, L, H, D] with equal B, H, D")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_mean, q_similar = _pool_blocks(q, q_block)
    k_mean, k_similar = _pool_blocks(k, k_block)
    probs = torch.softmax(torch.matmul(q_mean, k_mean.transpose(-1, -2)) * scale, dim=-1)  # [B, H, nq, nk]
    n_k = probs.shape[-1]
    order = probs.argsort(dim=-1, descending=True)
    if tau is not None:
        sorted_probs = probs.gather(-1, order)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the blocks ranked above
        keep_sorted = before < tau
    else:
        keep_sorted = torch.arange(n_k, device=q.device) < math.ceil(topk * n_k)
        keep_sorted = keep_sorted.expand_as(probs).clone()
    keep_sorted[..., 0] = True
    active = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    active |= (q_similar < min_similarity)[..., :, None]
    active |= (k_similar < min_similarity)[..., None, :]
    return BlockMask(active.contiguous(), q_block, k_block, q.shape[1], k.shape[1])
