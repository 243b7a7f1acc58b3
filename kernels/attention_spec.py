"""Inference attention: its options (ToDo key/value downsampling, block masks) and the PyTorch reference.

For queries q [B, Lq, H, D], keys k and values v [B, Lk, H, Dv] (diffusers' layout after the
head split), per batch b and head h:

    k', v'  = downsample(k), downsample(v)          (kv_downsample; else k' = k, v' = v)
    s[i, j] = scale * <q[b, i, h], k'[b, j, h]>     (scale: 1 / sqrt(D) unless given)
    s[i, j] = -inf where block_mask forbids (i, j)
    o[b, i, h] = sum_j softmax_j(s[i, :]) v'[b, j, h]     (a row with no allowed key: o = 0)

**ToDo** (token downsampling, Smith et al. 2024): :class:`KVDownsample` names the key/value
token grid (h, w) (row-major, so Lk = h*w), the factor f and the mode. The downsampled grid is
ceil(h/f) x ceil(w/f):

* ``"nearest"``: the strided pick k[:, ::f, ::f] on the grid;
* ``"average"``: the mean of each f x f cell (edge cells average the tokens they hold),
  accumulated in fp32 and rounded to the input dtype before the attention (as the kernel does).

**Block masks**: :class:`BlockMask` holds ``active`` bool [Bm, Hm, nqb, nkb] (Bm in {1, B},
Hm in {1, H}): query block i (tokens i*q_block .. (i+1)*q_block - 1) attends key block j iff
active[b, h, i, j]. Keys are the downsampled ones when both options are given. Builders are in
:mod:`diffrt.kernels.attention_masks`.

The launcher (checks, backend choice) is :func:`diffrt.kernels.attention` (attention_launch.py), the
Triton kernel :mod:`diffrt.kernels.attention_triton`; this module is the spec and the test truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("nearest", "average")


@dataclass(frozen=True)
class KVDownsample:
    """ToDo's key/value downsampling: token grid ``grid`` = (h, w), ``factor`` f >= 1, ``mode``."""

    grid: tuple[int, int]
    factor: int = 2
    mode: str = "nearest"

    def __post_init__(self) -> None:
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"KVDownsample: grid must be (h, w) with h, w >= 1, got {self.grid}")
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"KVDownsample: factor must be an integer >= 1, got {self.factor}")
        if self.mode not in MODES:
            raise ValueError(f"KVDownsample: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    @property
    def tokens(self) -> int:
        """Key/value tokens before downsampling: h * w."""
        return self.grid[0] * self.grid[1]

    @property
    def out_grid(self) -> tuple[int, int]:
        """The downsampled grid: (ceil(h / f), ceil(w / f))."""
        return -(-self.grid[0] // self.factor), -(-self.grid[1] // self.factor)

    @property
    def out_tokens(self) -> int:
        """Key/value tokens after downsampling."""
        return self.out_grid[0] * self.out_grid[1]


@dataclass(frozen=True)
class BlockMask:
    """Which key blocks each query block attends: ``active`` bool [Bm, Hm, nqb, nkb].

    ``q_len`` / ``k_len`` are the token counts it was built for (nqb = ceil(q_len / q_block),
    nkb = ceil(k_len / k_block)); block sizes are powers of two >= 16 (the kernel's tiles).
    """

    active: torch.Tensor
    q_block: int
    k_block: int
    q_len: int
    k_len: int

    def __post_init__(self) -> None:
        a = self.active
        if not torch.is_tensor(a) or a.dtype != torch.bool or a.dim() != 4:
            raise TypeError(f"BlockMask: active must be a 4-D bool tensor [Bm, Hm, nqb, nkb], got "
                            f"{getattr(a, 'dtype', type(a).__name__)} {tuple(getattr(a, 'shape', ()))}")
        for name in ("q_block", "k_block"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockMask: {name} must be a power of two >= 16, got {size}")
        expected = (-(-self.q_len // self.q_block), -(-self.k_len // self.k_block))
        if tuple(a.shape[2:]) != expected:
            raise ValueError(f"BlockMask: active has {tuple(a.shape[2:])} blocks; {self.q_len} queries / {self.k_len} "
                             f"keys in blocks of {self.q_block} / {self.k_block} need {expected}")

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are active."""
        return self.active.float().mean().item()

    def token_mask(self) -> torch.Tensor:
        """The mask per token pair, bool [Bm, Hm, q_len, k_len] (for references and tests)."""
        rows = self.active.repeat_interleave(self.q_block, dim=2)[:, :, : self.q_len]
        return rows.repeat_interleave(self.k_block, dim=3)[:, :, :, : self.k_len]

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_index int32 [Bm, Hm, nqb, max(1, most active)], kv_count int32 [Bm, Hm, nqb]).

        Row (b, h, i) of kv_index lists the active key blocks of query block i in ascending
        order, padded with 0; kv_count says how many are valid. The kernel reads these.
        """
        counts = self.active.sum(dim=3, dtype=torch.int32)
        width = max(1, int(counts.max().item()) if counts.numel() else 1)
        n_k = self.active.shape[3]
        order = torch.arange(n_k, device=self.active.device).expand_as(self.active)
        keyed = torch.where(self.active, order, order + n_k)  # active blocks first, in ascending order
        index = keyed.sort(dim=3).values[..., :width]
        index = torch.where(index >= n_k, torch.zeros_like(index), index)
        return index.to(torch.int32).contiguous(), counts.contiguous()

    def to(self, device: torch.device | str) -> BlockMask:
        return BlockMask(self.active.to(device), self.q_block, self.k_block, self.q_len, self.k_len)


def downsample_kv_reference(x: torch.Tensor, spec: KVDownsample, round_to: torch.dtype | None = None) -> torch.Tensor:
    """ToDo's downsampling of keys or values x [B, h*w, H, D] -> [B, ceil(h/f) * ceil(w/f), H, D].

    ``"average"`` sums in float32 (float64 for float64 input) and rounds the means to ``round_to``
    (default x's dtype).
    """
    batch, length, heads, dim = x.shape
    h, w = spec.grid
    if length != h * w:
        raise ValueError(f"kv_downsample: the grid {h}x{w} has {h * w} tokens, the keys have {length}")
    f = spec.factor
    grid = x.reshape(batch, h, w, heads, dim)
    if spec.mode == "nearest" or f == 1:
        return grid[:, ::f, ::f].reshape(batch, -1, heads, dim)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    hd, wd = spec.out_grid
    padded = torch.zeros(batch, hd * f, wd * f, heads, dim, dtype=acc_dtype, device=x.device)
    padded[:, :h, :w] = grid.to(acc_dtype)
    ones = torch.zeros(hd * f, wd * f, dtype=acc_dtype, device=x.device)
    ones[:h, :w] = 1
    sums = padded.reshape(batch, hd, f, wd, f, heads, dim).sum(dim=(2, 4))
    counts = ones.reshape(hd, f, wd, f).sum(dim=(1, 3))
    means = sums / counts[None, :, :, None, None]
    return means.reshape(batch, hd * wd, heads, dim).to(round_to or x.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        kv_downsample: KVDownsample | None = None, block_mask: BlockMask | None = None,
                        compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The spec (module docstring): [B, Lq, H, D] x [B, Lk, H, D] x [B, Lk, H, Dv] -> [B, Lq, H, Dv].

    Computed in ``compute_dtype`` (default float32; float64 for the test truth), returned in
    q's dtype. Downsampled keys are rounded to the input dtype first (the kernel's semantics)
    unless ``compute_dtype`` is float64, where nothing is rounded.
    """
    compute = compute_dtype or torch.float32
    out_dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if kv_downsample is not None:
        round_to = torch.float64 if compute == torch.float64 else k.dtype
        k = downsample_kv_reference(k.to(compute) if compute == torch.float64 else k, kv_downsample, round_to)
        v = downsample_kv_reference(v.to(compute) if compute == torch.float64 else v, kv_downsample, round_to)
    qh, kh, vh = (t.to(compute).permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, L, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if block_mask is not None:
        allowed = block_mask.token_mask().to(scores.device)
        scores = scores.masked_fill(~allowed, -math.inf)
        empty = ~allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    if block_mask is not None:
        probs = probs.masked_fill(empty, 0.0)
    return torch.matmul(probs, vh).permute(0, 2, 1, 3).to(out_dtype)
