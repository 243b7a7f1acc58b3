"""CUDA graphs: capture a computation once per shape bucket, replay it with static buffers.

:class:`GraphRunner` wraps ``fn(*tensors) -> tensor | tuple of tensors``. The first call with a
new bucket (the shapes, dtypes and devices of the inputs) warms ``fn`` up on a side stream,
captures it into a ``torch.cuda.CUDAGraph`` in the runner's memory pool (shared by all its
buckets) and keeps the static input and output buffers; every later call copies the inputs into
the static buffers and replays. Buffers are never re-allocated between replays. Warm-up and
capture times are recorded per bucket (:attr:`GraphRunner.timings`). Captures use
``capture_error_mode="thread_local"``, so other threads may keep working while one captures.

Threads: a runner holds one lock; a call copies, replays and copies the outputs out (``clone``,
the default) under it, so replays from two threads cannot corrupt each other's buffers (they
serialize: give each stream its own runner to overlap them). ``clone=False`` returns the static
outputs themselves: valid until the next call, for a single caller that consumes them at once.

Off CUDA the runner calls ``fn`` directly and logs once that graphs need CUDA tensors.
:func:`graph_denoiser` puts a Denoiser's model call behind a runner (the Sampler's step kernel
already reads its step from the device, so a whole sampling loop captures too:
:func:`capture_sampling`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .denoiser import Denoiser

log = logging.getLogger(__name__)


@dataclass
class BucketTimes:
    warmup_s: float
    capture_s: float
    replays: int = 0


class GraphRunner:
    """``fn`` behind one CUDA graph per input-shape bucket (module docstring)."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, clone: bool = True):
        self.fn, self.warmup, self.clone = fn, warmup, clone
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.timings: dict[tuple, BucketTimes] = {}
        self._lock = threading.Lock()
        self._pool = None
        self._eager_logged = False

    @staticmethod
    def bucket(tensors: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if not all(torch.is_tensor(t) for t in tensors):
            raise TypeError("GraphRunner takes tensors only (put other arguments in fn's closure)")
        if not tensors or not all(t.is_cuda for t in tensors):
            if not self._eager_logged:
                self._eager_logged = True
                log.info("CUDA graphs need CUDA tensors: running %s eagerly", getattr(self.fn, "__name__", self.fn))
            return self.fn(*tensors)
        key = self.bucket(tensors)
        with self._lock:
            if key not in self._graphs:
                self._capture(key, tensors)
            graph, static_inputs, static_outputs = self._graphs[key]
            for buffer, value in zip(static_inputs, tensors):
                buffer.copy_(value)
            graph.replay()
            self.timings[key].replays += 1
            if not self.clone:
                return static_outputs
            return _map(static_outputs, lambda t: t.clone())

    def _capture(self, key: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        static_inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        start = time.perf_counter()
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_outputs = self.fn(*static_inputs)
        torch.cuda.synchronize()
        self.timings[key] = BucketTimes(warmup_s, time.perf_counter() - start)
        self._graphs[key] = (graph, static_inputs, static_outputs)
        log.info("captured a CUDA graph for %s: warm-up %.3f s, capture %.3f s", key, warmup_s,
                 self.timings[key].capture_s)


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        return fn(value)
    return type(value)(_map(v, fn) for v in value)


def pad_rows(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], int]:
    """Tensors [n, ...] padded to the next power of two rows (repeating row 0), and n."""
    n = tensors[0].shape[0]
    if n & (n - 1) == 0:
        return tensors, n
    pad = (1 << n.bit_length()) - n
    return tuple(torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in tensors), n


class GraphDenoiser(Denoiser):
    """A Denoiser whose model call replays a CUDA graph per bucket (``cond`` a tensor or None).

    ``pad_batches``: batches are padded to the next power of two rows, so batch sizes that change
    from call to call (adaptive guidance's compacted unconditional rows) replay a few graphs instead
    of capturing one per size; the padding rows' outputs are dropped.
    """

    def __init__(self, base: Denoiser, warmup: int = 2, pad_batches: bool = False):
        super().__init__(base.model, base.schedule, sample_shape=base.sample_shape, call=base._call, dtype=base.dtype)
        self.base = base
        self.pad_batches = pad_batches
        self.runner = GraphRunner(self._forward, warmup=warmup)
        self.runner_uncond = GraphRunner(lambda x, t: self._forward(x, t, None), warmup=warmup)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(x, t, cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).contiguous()
        if cond is not None and not torch.is_tensor(cond):
            raise TypeError("a graph-captured denoiser takes cond as a tensor")
        n = x.shape[0]
        if self.pad_batches and cond is not None and cond.dim() > 0 and cond.shape[0] == 1 < n:
            cond = cond.expand(n, *cond.shape[1:])  # one condition for all rows: pad it as a batch
        inputs = (x, t) if cond is None else (x, t, cond)
        if self.pad_batches:
            inputs, n = pad_rows(inputs)
        out = (self.runner_uncond if cond is None else self.runner)(*inputs)
        return out[:n] if out.shape[0] != n else out

    def check_plan(self, plan) -> None:
        check = getattr(self.base, "check_plan", None)
        if check is not None:
            check(plan)


def graph_denoiser(den: Denoiser, warmup: int = 2, pad_batches: bool = False) -> GraphDenoiser:
    """``den`` with its model call captured per shape bucket (module docstring; ``pad_batches``:
    power-of-two batch buckets, for adaptive guidance)."""
    return GraphDenoiser(den, warmup, pad_batches)


def capture_sampling(sampler, noise: torch.Tensor, cond: Any = None, uncond: Any = None) -> GraphRunner:
    """A runner replaying the whole ``sampler.sample(noise, cond, uncond)`` loop (no host syncs in it):
    call it with new noise (and conditions) of the same shapes."""
    def sample(x, *conditions):
        c = conditions[0] if conditions else None
        u = conditions[1] if len(conditions) > 1 else None
        return sampler.sample(x, cond=c, uncond=u, check=False)

    runner = GraphRunner(sample)
    runner(noise, *[c for c in (cond, uncond) if c is not None])
    return runner
