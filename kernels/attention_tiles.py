"""Tile choice for the Triton attention kernel: a heuristic, and candidates for the autotuner.

A :class:`Tile` is (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages, TMA or pointer reads).
With a block mask the block sizes are the mask's (the kernel visits the mask's blocks); only warps,
stages and the read path vary. On CUDA :mod:`diffrt.kernels.autotune` times the candidates once
per shape class (device, dtype, head dims, query / key length rounded up to a power of two, ToDo
mode and factor, mask blocks, whether TMA can read the keys); without timing (``DIFFRT_AUTOTUNE=0``,
graph capture) the heuristic tile runs, so it must fit the GPU: it depends on the compute
capability. TMA tiles are offered on Hopper (9.x) when the keys are dense or ToDo-nearest with a
power-of-two width and 16-byte aligned (:func:`~diffrt.kernels.attention_triton.tma_reads`);
there the heuristic takes them for fp16 / bf16. Under the Triton interpreter tiles of 32 (128
beyond 512 tokens) keep the interpreted loops short and still visit several blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import autotune
from .attention_spec import BlockMask

INTERPRETER_BLOCK = 32
TMA_MAX_BOX = 256  # the TMA unit copies boxes of at most 256 rows


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


def _padded_cols(dim: int) -> int:
    from .attention_triton import head_dim_chunks  # noqa: PLC0415

    d1, d2 = head_dim_chunks(dim)
    return d1 + d2


def heuristic(head_dim: int, value_dim: int, block_mask: BlockMask | None, mode: int = 0,
              dtype: torch.dtype = torch.float16, tma: bool = False, arch: int | None = None) -> Tile:
    """The tile used without timing: no spills for fp16 / bf16 up to head dim 160, shared memory
    within sm_80's 166,912 B (so within sm_90's 232,448 B too), K / V copies pipelined. ``arch``:
    the GPU's compute capability major (None: Hopper's choice); ``tma``: the caller checked
    :func:`tma_available` (taken for fp16 / bf16 dense and nearest keys).

    From ``python -m diffrt.kernels.compile_check`` (Triton 3.9, fp16; 3.6 agrees; 2026-12-02):
    128 x 64, 8 warps, 3 stages up to head dim 128 (sm_90 hd64: 107 registers, 64 KB with TMA,
    122 registers with pointers; hd128: 146 / 178 registers, 128 KB); 128 x 32, 2 stages for
    averaged ToDo keys (the f x f loads of a key tile are live at once; sm_90 hd128: 184 registers,
    104 KB), 128 x 16 on sm_80 above head dim 80 (hd128: 255 registers and a spill at 128 x 32 with
    Triton 3.6, none at 128 x 16); 64 x 32, 2 stages above 128 (hd256: 154 registers, 96 KB) and
    64 x 16 for averaged keys above 160 (sm_90 hd256: 186 registers, 104 KB, where 64 x 32 spilled
    at 255). fp32 multiplies on the CUDA cores (IEEE, no TF32): 64 x 16, and one stage for averaged
    keys above 128 (hd256: 86 KB, where 64 x 32 needed 368,896 B). TMA on sm_90 takes fewer
    registers than pointers at every fp16 / bf16 head dim (hd72: 120 against 146, two blocks per
    SM instead of one) for about as many instructions per key tile (hd64: 314 against 301); fp32
    keeps pointers (its CUDA-core products spilled more with TMA: hd128 1,328 B against 688 B).
    """
    cols = max(_padded_cols(head_dim), _padded_cols(value_dim))
    mma_only = arch is not None and arch < 9  # mma.sync keeps operands and accumulators in registers
    if dtype == torch.float32:
        tile = Tile(64, 16, 8, 1 if mode == 2 and cols > 128 else 2)
    elif cols > 128:
        tile = Tile(64, 16 if mode == 2 and cols > 160 else 32, 8, 2)
    elif mode == 2:
        tile = Tile(128, 16 if mma_only and cols > 80 else 32, 8, 2)
    else:
        tile = Tile(128, 64, 8, 3)
    if block_mask is not None:  # the mask's blocks (on sm_80 above head dim 128, quarters x halves of them)
        if _split_blocks(block_mask, cols, dtype, mma_only):
            tile = Tile(block_mask.q_block // 4, block_mask.k_block // 2, 4, 2)
        else:
            tile = replace(tile, block_m=block_mask.q_block, block_n=block_mask.k_block,
                           num_stages=1 if dtype == torch.float32 and cols > 128 else tile.num_stages)
    tma = tma and mode in (0, 1) and dtype != torch.float32 and tile.block_n <= TMA_MAX_BOX
    return replace(tile, tma=tma)


def _split_blocks(block_mask: BlockMask, cols: int, dtype: torch.dtype, mma_only: bool) -> bool:
    """Whether a block mask's blocks run as tiles of a quarter of its query rows and half its keys: on sm_80
    (mma.sync keeps the operands in registers) above head dim 128 in fp16 / bf16, where the mask's 64 x 64
    needs 255 registers and spills, and so do 64 x 32 and 32 x 32 with the mask's block-index loads (SD1.5's
    hd160 layers, Triton 3.9; 16 x 32 with 4 warps: 128 registers, no spill, K / V pipelined)."""
    return (mma_only and dtype != torch.float32 and cols > 128 and block_mask.q_block % 64 == 0
            and block_mask.k_block % 32 == 0)


def candidates(head_dim: int, value_dim: int, block_mask: BlockMask | None, mode: int = 0,
               dtype: torch.dtype = torch.float16, tma: bool = False, arch: int | None = None) -> list[Tile]:
    """Tiles the autotuner times, the heuristic first (few: each costs a compile on first use);
    with ``tma`` the first three pointer tiles have a TMA twin."""
    cols = max(_padded_cols(head_dim), _padded_cols(value_dim))
    if block_mask is not None:
        bm, bn = block_mask.q_block, block_mask.k_block
        options = [Tile(bm, bn, warps, stages) for warps in (8, 4) for stages in (3, 2)]
    elif dtype == torch.float32:
        options = [Tile(64, 16, 8, 2), Tile(64, 32, 8, 2), Tile(32, 32, 4, 2), Tile(64, 16, 8, 1)]
    elif cols <= 128:
        options = [Tile(128, 64, 8, 3), Tile(128, 64, 4, 3), Tile(128, 128, 8, 3), Tile(64, 64, 4, 3),
                   Tile(128, 32, 8, 2)]
    else:
        options = [Tile(64, 32, 8, 2), Tile(64, 64, 8, 2), Tile(64, 16, 8, 2), Tile(128, 32, 8, 2),
                   Tile(64, 32, 4, 2)]
    if tma and mode in (0, 1):
        options = [replace(tile, tma=True) for tile in options[:3] if tile.block_n <= TMA_MAX_BOX] + options
    tiles = [heuristic(head_dim, value_dim, block_mask, mode, dtype, tma, arch)]
    return tiles + [tile for tile in options if tile not in tiles]


def _capability_major(device: torch.device) -> int | None:
    """The compute capability's major version of ``device``; off CUDA, that of the target Triton's
    active driver names (:mod:`diffrt.kernels.compile_check` compiles CPU tensors for sm_90 / sm_80
    through a stand-in driver), None where there is none."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0]
    try:
        from triton.runtime.driver import driver  # noqa: PLC0415

        target = driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no active driver (CPU only): no capability
        return None
    return target.arch // 10 if target.backend == "cuda" and isinstance(target.arch, int) else None


def tma_available(q, k, v, down, arch: int | None) -> bool:
    """Whether the TMA variant can serve this call: a Hopper GPU (``arch`` 9) and keys it can read."""
    from .attention_triton import tma_reads  # noqa: PLC0415

    return arch == 9 and tma_reads(k, v, down)


def _key(q, k, v, down, block_mask, tma: bool) -> tuple:
    def bucket(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    masked = None if block_mask is None else (block_mask.q_block, block_mask.k_block)
    return (str(q.device), q.dtype, q.shape[3], v.shape[3], bucket(q.shape[1]), bucket(k.shape[1]), down[:2], masked,
            tma)


def choose_tiles(q, k, v, down, block_mask, launch: Callable[[Tile], None], interpreting: bool) -> Tile:
    """The tile for this call (module docstring)."""
    if interpreting:
        if block_mask is not None:
            return Tile(block_mask.q_block, block_mask.k_block, 4, 1)
        block = INTERPRETER_BLOCK if max(q.shape[1], k.shape[1]) <= 512 else 4 * INTERPRETER_BLOCK
        return Tile(block, block, 4, 1)
    arch = _capability_major(q.device)
    tma = tma_available(q, k, v, down, arch)
    options = candidates(q.shape[3], v.shape[3], block_mask, down[0], q.dtype, tma, arch)
    return autotune.choose("attention", _key(q, k, v, down, block_mask, tma), options, launch, q.device)
