"""Tile choice for the Triton attention kernel: a heuristic, and a small autotuner on CUDA.

A :class:`Tile` is (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages). With a block mask the
block sizes are the mask's (the kernel visits the mask's blocks); only warps and stages vary.

On CUDA, the first call of a shape class (device, dtype, head dims, query / key length rounded up
to a power of two, ToDo mode and factor, mask blocks) times each candidate (one launch to
compile, then the median of ``REPEATS`` launches between CUDA events) and caches the fastest;
candidates that do not fit (shared memory, registers) are skipped. Inside CUDA-graph capture, or
with ``DIFFRT_ATTENTION_AUTOTUNE=0``, the heuristic tile is used without timing. Under the
Triton interpreter tiles of 32 (128 beyond 512 tokens) keep the interpreted loops short and still
visit several blocks.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .attention_spec import BlockMask

log = logging.getLogger("diffrt.kernels")

REPEATS = 5
INTERPRETER_BLOCK = 32


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


_chosen: dict[tuple, Tile] = {}
_lock = threading.Lock()


def _padded_cols(dim: int) -> int:
    from .attention_triton import head_dim_chunks  # noqa: PLC0415

    d1, d2 = head_dim_chunks(dim)
    return d1 + d2


def heuristic(head_dim: int, value_dim: int, block_mask: BlockMask | None, mode: int = 0) -> Tile:
    """The tile used without timing, chosen so that sm_90 code does not spill (registers read from
    ``python -m diffrt.kernels.attention_compile``): 8 warps; narrower key tiles for averaged ToDo
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


def _time(launch: Callable[[Tile], None], tile: Tile) -> float:
    launch(tile)  # compile and warm up
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(tile)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose_tiles(q, k, v, down, block_mask, launch: Callable[[Tile], None], interpreting: bool) -> Tile:
    """The tile for this call: cached per shape class; timed once per class on CUDA (module docstring)."""
    if interpreting:
        if block_mask is not None:
            return Tile(block_mask.q_block, block_mask.k_block, 4, 1)
        block = INTERPRETER_BLOCK if max(q.shape[1], k.shape[1]) <= 512 else 4 * INTERPRETER_BLOCK
        return Tile(block, block, 4, 1)
    key = _key(q, k, v, down, block_mask)
    tile = _chosen.get(key)
    if tile is not None:
        return tile
    tile = heuristic(q.shape[3], v.shape[3], block_mask, down[0])
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if os.environ.get("DIFFRT_ATTENTION_AUTOTUNE", "1") == "0" or capturing or not q.is_cuda:
        if capturing:
            log.warning("attention: first call of shape class %s inside graph capture; heuristic tile %s", key, tile)
        return tile
    timings = {}
    for candidate in candidates(q.shape[3], v.shape[3], block_mask, down[0]):
        try:
            timings[candidate] = _time(launch, candidate)
        except Exception as error:  # noqa: BLE001 - a tile that does not fit (shared memory, registers)
            log.debug("attention: tile %s skipped: %s", candidate, error)
    if timings:
        tile = min(timings, key=timings.get)
        log.info("attention: tile %s for %s (%.3f ms; heuristic %s)", tile, key, timings[tile],
                 heuristic(q.shape[3], v.shape[3], block_mask, down[0]))
    with _lock:
        _chosen[key] = tile
    return tile


def clear() -> None:
    """Forget the chosen tiles (tests)."""
    with _lock:
        _chosen.clear()
