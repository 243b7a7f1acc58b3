"""Tile choice for the Triton attention kernel: a heuristic, and candidates for the autotuner.

A :class:`Tile` is (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages). With a block mask the
block sizes are the mask's (the kernel visits the mask's blocks); only warps and stages vary.
On CUDA :mod:`diffrt.kernels.autotune` times the candidates once per shape class (device, dtype,
head dims, query / key length rounded up to a power of two, ToDo mode and factor, mask blocks);
without timing the heuristic tile runs. Under the Triton interpreter tiles of 32 (128 beyond 512
tokens) keep the interpreted loops short and still visit several blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import autotune
from .attention_spec import BlockMask

INTERPRETER_BLOCK = 32


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _padded_cols(dim: int) -> int:
    from .attention_triton import head_dim_chunks  # noqa: PLC0415

    d1, d2 = head_dim_chunks(dim)
    return d1 + d2


def heuristic(head_dim: int, value_dim: int, block_mask: BlockMask | None, mode: int = 0) -> Tile:
    """The tile used without timing, chosen so that sm_90 code does not spill (registers read from
    ``python -m diffrt.kernels.compile_check``): 8 warps; narrower key tiles for averaged ToDo
    keys (the f x f loads of a key tile are live at once) and for head dims above 128."""
    cols = max(_padded_cols(head_dim), _padded_cols(value_dim))
    if cols > 128:
        tile = Tile(64, 32, 8, 2)
    elif mode == 2:
        tile = Tile(128, 32, 8, 2)
    else:
        tile = Tile(128, 64, 8, 3)
    if block_mask is not None:
        tile = Tile(block_mask.q_block, block_mask.k_block, tile.num_warps, tile.num_stages)
    return tile


def candidates(head_dim: int, value_dim: int, block_mask: BlockMask | None, mode: int = 0) -> list[Tile]:
    """Tiles the autotuner times, the heuristic first (few: each costs a compile on first use)."""
    cols = max(_padded_cols(head_dim), _padded_cols(value_dim))
    if block_mask is not None:
        bm, bn = block_mask.q_block, block_mask.k_block
        options = [Tile(bm, bn, warps, stages) for warps in (8, 4) for stages in (3, 2)]
    elif cols <= 128:
        options = [Tile(128, 64, 8, 3), Tile(128, 64, 4, 3), Tile(128, 128, 8, 3), Tile(64, 64, 4, 3),
                   Tile(128, 32, 8, 2)]
    else:
        options = [Tile(64, 32, 8, 2), Tile(64, 64, 8, 2), Tile(128, 32, 8, 2), Tile(64, 32, 4, 2)]
    tiles = [heuristic(head_dim, value_dim, block_mask, mode)]
    return tiles + [tile for tile in options if tile not in tiles]


def _key(q, k, v, down, block_mask) -> tuple:
    def bucket(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    masked = None if block_mask is None else (block_mask.q_block, block_mask.k_block)
    return (str(q.device), q.dtype, q.shape[3], v.shape[3], bucket(q.shape[1]), bucket(k.shape[1]), down[:2], masked)


def choose_tiles(q, k, v, down, block_mask, launch: Callable[[Tile], None], interpreting: bool) -> Tile:
    """The tile for this call (module docstring)."""
    if interpreting:
        if block_mask is not None:
            return Tile(block_mask.q_block, block_mask.k_block, 4, 1)
        block = INTERPRETER_BLOCK if max(q.shape[1], k.shape[1]) <= 512 else 4 * INTERPRETER_BLOCK
        return Tile(block, block, 4, 1)
    return autotune.choose("attention", _key(q, k, v, down, block_mask),
                           candidates(q.shape[3], v.shape[3], block_mask, down[0]), launch, q.device)
