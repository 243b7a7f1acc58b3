"""A small autotuner for diffrt's Triton kernels, safe around CUDA-graph capture.

``choose(op, key, candidates, launch, device)`` returns the fastest of ``candidates`` (tile
configurations) for a shape class ``key``: on the first call of that class it launches each
candidate once (compile, warm up), times ``REPEATS`` launches between CUDA events, keeps the
median, and caches the winner; candidates that fail (shared memory, registers) are skipped.
Later calls cost a dict lookup. With ``DIFFRT_AUTOTUNE=0``, inside CUDA-graph capture, or off
CUDA it returns the first candidate (the heuristic) untimed. The winner is logged at INFO.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
from typing import Any, Callable, Hashable, Sequence

import torch

log = logging.getLogger("diffrt.kernels")

REPEATS = 5

_chosen: dict[tuple, Any] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """Whether timing is allowed (``DIFFRT_AUTOTUNE`` unset or not "0")."""
    return os.environ.get("DIFFRT_AUTOTUNE", "1") != "0"


def _time(launch: Callable[[Any], None], candidate: Any) -> float:
    launch(candidate)  # compile and warm up
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(candidate)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose(op: str, key: Hashable, candidates: Sequence[Any], launch: Callable[[Any], None],
           device: torch.device) -> Any:
    """The candidate to run for shape class ``key`` of ``op`` (module docstring)."""
    full_key = (op, key)
    chosen = _chosen.get(full_key)
    if chosen is not None:
        return chosen
    heuristic = candidates[0]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if device.type != "cuda" or capturing or not enabled():
        if capturing:
            log.warning("%s: first call of shape class %s inside graph capture; heuristic %s", op, key, heuristic)
        return heuristic
    timings = {}
    for candidate in candidates:
        try:
            timings[candidate] = _time(launch, candidate)
        except Exception as error:  # noqa: BLE001 - a configuration that does not fit this GPU
            log.debug("%s: %s skipped: %s", op, candidate, error)
    chosen = min(timings, key=timings.get) if timings else heuristic
    if timings:
        log.info("%s: %s for %s (%.4f ms; heuristic %s)", op, chosen, key, timings[chosen], heuristic)
    with _lock:
        _chosen[full_key] = chosen
    return chosen


def clear() -> None:
    """Forget every cached choice (tests)."""
    with _lock:
        _chosen.clear()
