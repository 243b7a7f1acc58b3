"""A per-frame deadline for StreamPipeline: degrade within the user's quality floor instead of dropping frames.

``StreamPipeline(..., deadline=DeadlinePolicy(budget_ms=10))`` times every tick: on CPU with ``clock``;
on a GPU with a pair of CUDA events around the tick, read when they have completed (``query()``: the host
never waits, so a tick's time counts a tick or more after it ran); after ``patience`` ticks over the budget
it takes the next rung of its ladder, and after ``patience`` ticks under ``recover_below`` x the budget it
steps back.
The ladder is the user's quality floor: only the rungs in ``allow`` are ever taken, in that order:

* ``"residual-guidance"``: full or initialize CFG -> residual CFG "self" (no unconditional rows;
  noise-prediction models only, else the rung is passed over);
* ``"no-guidance"``: CFG off;
* ``"exit-earlier"``: layer early exit at ``exit_threshold`` (a model with exit heads, e.g. the digits
  DiT; passed over for other models, step-cached ones and graph-captured ticks, whose exits would need a
  host read);
* ``"more-caching"``: the step cache's threshold raised to ``cache_threshold`` (a denoiser made with
  ``optimize(den, step_cache=...)``; passed over otherwise);
* ``"more-skips"``: the similarity filter at ``skip_threshold`` (more near-identical frames reuse the
  previous output).

Frames are never dropped. ``policy.rung`` is the rung in force (None: none), ``policy.changes`` the
(tick, rung) history, and each :class:`~diffrt.runtime.stream.StreamResult` says which rung made it.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

LADDER = ("residual-guidance", "no-guidance", "exit-earlier", "more-caching", "more-skips")


@dataclass
class DeadlinePolicy:
    budget_ms: float
    allow: tuple[str, ...] = LADDER
    patience: int = 3
    recover_below: float = 0.6
    skip_threshold: float = 0.95
    exit_threshold: float = 0.2  # the Sampler's default (56 % of the digits DiT's blocks, 0.6 accuracy points)
    cache_threshold: float = 0.1  # 21 % of the digits DiT's blocks at 50 dB (0.15: 62 % but FID +48 %)
    clock: Callable[[], float] = time.perf_counter  # seconds; tests pass a simulated clock
    level: int = 0  # how many rungs of ``allow`` are in force
    changes: list[tuple[int, str | None]] = field(default_factory=list)
    _over: int = 0
    _under: int = 0
    _original: dict | None = None
    _timing: collections.deque = field(default_factory=collections.deque, repr=False)  # CUDA event pairs in flight

    def __post_init__(self) -> None:
        unknown = [r for r in self.allow if r not in LADDER]
        if unknown or self.budget_ms <= 0:
            raise ValueError(f"DeadlinePolicy: budget_ms must be > 0 and allow a subset of {LADDER}, got "
                             f"{self.budget_ms}, {self.allow}")

    @property
    def rung(self) -> str | None:
        return self.allow[self.level - 1] if self.level else None

    def start(self, device: torch.device | None = None) -> Any:
        """Before a tick: the clock's time, or on a CUDA ``device`` an event recorded on its stream."""
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def observe(self, pipe, started: Any) -> None:
        """After a tick: measure it (on a GPU, the ticks whose events have completed) and move along the
        ladder if the budget says so."""
        if isinstance(started, torch.cuda.Event):
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._timing.append((started, ended))
            while self._timing and self._timing[0][1].query():
                begin, end = self._timing.popleft()
                self._judge(pipe, begin.elapsed_time(end))
            return
        self._judge(pipe, 1e3 * (self.clock() - started))

    def _judge(self, pipe, elapsed_ms: float) -> None:
        if self._original is None:
            cache = getattr(pipe.den, "step_cache", None)
            self._original = {"cfg_type": pipe.cfg_type, "similarity_threshold": pipe.similarity_threshold,
                              "early_exit": pipe.early_exit, "cache_threshold": None if cache is None else cache.threshold}
        if elapsed_ms > self.budget_ms:
            self._over, self._under = self._over + 1, 0
            if self._over >= self.patience and self.level < len(self.allow):
                self._move(pipe, +1, elapsed_ms)
        elif elapsed_ms < self.recover_below * self.budget_ms:
            self._under, self._over = self._under + 1, 0
            if self._under >= self.patience and self.level > 0:
                self._move(pipe, -1, elapsed_ms)
        else:
            self._over = self._under = 0

    def _move(self, pipe, step: int, elapsed_ms: float) -> None:
        self.level += step
        self._over = self._under = 0
        self._apply(pipe)
        self.changes.append((pipe.stats.ticks, self.rung))
        log.info("deadline %.1f ms: tick took %.1f ms, now %s", self.budget_ms, elapsed_ms, self.rung or "no degradation")

    def _apply(self, pipe) -> None:
        original = self._original
        pipe.cfg_type, pipe.similarity_threshold = original["cfg_type"], original["similarity_threshold"]
        pipe.early_exit = original.get("early_exit")
        cache = getattr(pipe.den, "step_cache", None)
        if cache is not None and original.get("cache_threshold") is not None:
            cache.threshold = original["cache_threshold"]
        for rung in self.allow[: self.level]:
            if rung == "residual-guidance" and pipe.cfg_type in ("full", "initialize") and \
                    pipe.den.prediction_type == "epsilon":
                pipe.cfg_type = "self"
                pipe.stock_noise = pipe.init_noise.clone()
            elif rung == "no-guidance":
                pipe.cfg_type = "none"
            elif rung == "exit-earlier" and pipe.supports_early_exit:
                pipe.early_exit = max(pipe.early_exit or 0.0, self.exit_threshold)
            elif rung == "more-caching" and cache is not None:
                cache.threshold = max(cache.threshold, self.cache_threshold)
            elif rung == "more-skips":
                current = pipe.similarity_threshold
                pipe.similarity_threshold = self.skip_threshold if current is None else min(current,
                                                                                             self.skip_threshold)
