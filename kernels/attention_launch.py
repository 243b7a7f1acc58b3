"""Launcher of inference attention: checks, backend choice, tile choice, launch.

``attention(q, k, v, scale=None, kv_downsample=None, block_mask=None, backend="auto")`` computes
the spec of :mod:`diffrt.kernels.attention_spec` for q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, Dv]
(any strides: diffusers' ``view(B, L, H, D)`` after the projections needs no copy) and returns a
new contiguous [B, Lq, H, Dv] tensor in q's dtype.

Backends, in the order "auto" tries them:

* ``triton``: the fused kernel (:mod:`diffrt.kernels.attention_triton`) on CUDA tensors of
  compute capability >= 8.0; on CPU tensors only under ``TRITON_INTERPRET=1`` and when asked
  for by name (tests: "auto" never interprets);
* ``torch``: PyTorch's scaled_dot_product_attention on K/V downsampled by the reference (a
  pooled copy), or the masked reference for block masks; serves any device;
* ``reference``: :func:`~diffrt.kernels.attention_spec.attention_reference` (fp32 compute).

``registry.explain("attention", q, k, v, ...)`` says which backend serves a call and why the others
do not. On CUDA the first call of each shape class times a few tile configurations and keeps the
fastest (``DIFFRT_AUTOTUNE=0`` takes the heuristic tile instead); the choice is cached,
so calls inside CUDA-graph capture launch without timing. On Hopper the candidates include the
kernel's TMA variant (tensor descriptors) where the keys' layout allows it
(:mod:`diffrt.kernels.attention_tiles`).
"""
from __future__ import annotations

import logging
import math
import numbers
import torch
import torch.nn.functional as F

from . import registry
from .attention_spec import BlockMask, KVDownsample, attention_reference, downsample_kv_reference

log = logging.getLogger("diffrt.kernels")

OP = "attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MODE_CODES = {"nearest": 1, "average": 2}


def _features(q, k, v, scale=None, kv_downsample=None, block_mask=None) -> dict:
    return {"device": q.device.type, "index": q.device.index, "dtype": str(q.dtype).replace("torch.", ""),
            "head_dim": q.shape[-1], "value_dim": v.shape[-1], "sparse": block_mask is not None,
            "downsample": None if kv_downsample is None else kv_downsample.mode}


def _check(q, k, v, scale, kv_downsample, block_mask) -> None:
    """Raise TypeError / ValueError naming the offending shape, dtype or device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, L, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"attention: q is {q.dtype} on {q.device} but {name} is {t.dtype} on {t.device}")
    (batch, q_len, heads, head_dim), (k_batch, k_len, k_heads, k_dim) = q.shape, k.shape
    if (k_batch, k_heads, k_dim) != (batch, heads, head_dim) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, Dv] with the same B and H")
    if min(q_len, k_len, head_dim, v.shape[3]) == 0:
        raise ValueError(f"attention: empty input q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if max(head_dim, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {max(head_dim, v.shape[3])} > {MAX_HEAD_DIM} is not supported")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(float(scale))):
        raise ValueError(f"attention: scale must be None or a finite number, got {scale!r}")
    keys = k_len
    if kv_downsample is not None:
        if not isinstance(kv_downsample, KVDownsample):
            raise TypeError(f"attention: kv_downsample must be a KVDownsample, got {type(kv_downsample).__name__}")
        if kv_downsample.tokens != k_len:
            raise ValueError(f"attention: kv_downsample grid {kv_downsample.grid} has {kv_downsample.tokens} tokens, "
                             f"k has {k_len}")
        keys = kv_downsample.out_tokens
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"attention: block_mask must be a BlockMask, got {type(block_mask).__name__}")
        if (block_mask.q_len, block_mask.k_len) != (q_len, keys):
            raise ValueError(f"attention: block_mask is for {block_mask.q_len} queries x {block_mask.k_len} keys; this "
                             f"call has {q_len} x {keys}{' (after downsampling)' if kv_downsample else ''}")
        mask_b, mask_h = block_mask.active.shape[:2]
        if mask_b not in (1, batch) or mask_h not in (1, heads):
            raise ValueError(f"attention: block_mask is [{mask_b}, {mask_h}, ...]; expected batch 1 or {batch} and "
                             f"heads 1 or {heads}")


# ------------------------------------------------------------------------------------------ backends
def _run_reference(q, k, v, scale, kv_downsample, block_mask):
    return attention_reference(q, k, v, scale, kv_downsample, block_mask).contiguous()


def _run_torch(q, k, v, scale, kv_downsample, block_mask):
    if block_mask is not None:
        return _run_reference(q, k, v, scale, kv_downsample, block_mask)
    if kv_downsample is not None:
        k, v = downsample_kv_reference(k, kv_downsample), downsample_kv_reference(v, kv_downsample)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a mask table with size-1 batch / head dims read as broadcast (stride 0)."""
    return tuple(0 if (i < 2 and t.shape[i] == 1) else t.stride(i) for i in range(3))


def _run_triton(q, k, v, scale, kv_downsample, block_mask):
    from . import attention_triton as kernel  # noqa: PLC0415 - triton is imported on first use
    from .attention_tiles import choose_tiles  # noqa: PLC0415

    batch, q_len, heads, _ = q.shape
    out = torch.empty((batch, q_len, heads, v.shape[3]), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    if kv_downsample is None:
        down = (0, 1, 1, 1, 1)
    else:
        down = (MODE_CODES[kv_downsample.mode] if kv_downsample.factor > 1 else 0, kv_downsample.factor,
                *kv_downsample.grid, kv_downsample.out_grid[1])
    dot_fp32 = registry.interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 arithmetic is wrong
    if block_mask is not None:
        index, count = block_mask_tables(block_mask, q.device)
        tables = (index, count, _broadcast_strides(index), _broadcast_strides(count))
    else:
        tables = (None, None, (0, 0, 0), (0, 0, 0))

    def launch(tile) -> None:
        q_split, k_split = (1, 1) if block_mask is None else (block_mask.q_block // tile.block_m,
                                                              block_mask.k_block // tile.block_n)
        kernel.launch(q, k, v, out, *tables, scale, down, tile.block_m, tile.block_n, tile.num_warps,
                      tile.num_stages, dot_fp32, tile.tma, q_split, k_split)

    tile = choose_tiles(q, k, v, down, block_mask, launch, interpreting=registry.interpreting())
    launch(tile)
    return out


def block_mask_tables(block_mask: BlockMask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask's (kv_index, kv_count) on ``device``, computed once per mask and device."""
    cache = block_mask.__dict__.setdefault("_tables", {})
    key = str(device)
    if key not in cache:
        index, count = block_mask.indices()
        cache[key] = (index.to(device), count.to(device))
    return cache[key]


registry.add_op(OP, _features)
registry.register(OP, "triton", _run_triton, registry.triton_problem, priority=0, devices=("cuda", "cpu"),
                  auto_devices=("cuda",))
registry.register(OP, "torch", _run_torch, lambda features: None, priority=50)
registry.register(OP, "reference", _run_reference, lambda features: None, priority=100)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              kv_downsample: KVDownsample | None = None, block_mask: BlockMask | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Attention of q [B, Lq, H, D] over k [B, Lk, H, D], v [B, Lk, H, Dv] -> [B, Lq, H, Dv] (q's dtype).

    ``scale`` defaults to 1 / sqrt(D). ``kv_downsample``: a :class:`KVDownsample` (ToDo; k and v
    lie on its token grid). ``block_mask``: a :class:`BlockMask` over (queries, keys after
    downsampling); rows whose keys are all masked come out 0. ``backend``: "auto", "triton",
    "torch" or "reference" (module docstring). Inputs are not scanned for NaN (that would sync).
    """
    _check(q, k, v, scale, kv_downsample, block_mask)
    chosen = registry.choose_for(OP, _features(q, k, v, scale, kv_downsample, block_mask), backend)
    return chosen.run(q, k, v, scale, kv_downsample, block_mask)
