"""The call context: the per-call switches of diffrt's speed-ups, in one place.

diffrt's speed-ups live inside the model's modules (attention processors, W8A8 layers, the step
cache's block forwards, exit heads) but act only during the calls that asked for them, so a plain
denoiser and its optimized variants share one set of weights and each keeps its own outputs. The
caller (an :class:`~diffrt.runtime.optimized.OptimizedDenoiser` call, the Sampler's early exit, the
ONNX exporter) turns switches on for the duration of a call::

    with context.switches(attention=(settings, (64, 64)), step_cache=cache):
        out = model(x, t, cond)

and the layers read them with ``context.current().attention`` etc. Each switch is one field of
:class:`CallContext` (None: off); a new switch is one more field. The context is a
:class:`contextvars.ContextVar`, so threads (a server's workers) and asyncio tasks each see their own.

This module imports nothing from diffrt: every layer of the package may use it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class CallContext:
    """The switches of the call in progress on this thread (None: off).

    * ``attention``: (:class:`~diffrt.runtime.attention.AttentionSettings`, the sample's (H, W) or
      None): diffrt's attention processors run the fused kernel with these settings.
    * ``int8``: (group_ids int64 [B] on the device or None, mode, {module: W8A8Weights}): the W8A8
      layers of :mod:`diffrt.export.quant`; mode "static" / "dynamic" (kernels), "qdq" / "qdq-group"
      (ONNX export).
    * ``step_cache``: the :class:`~diffrt.runtime.step_cache.StepCache` of the trajectory in progress.
    * ``early_exit``: the :class:`~diffrt.runtime.early_exit.ExitState` a model with exit heads obeys.
    * ``pipeline``: the :class:`~diffrt.runtime.pipeline.PipelineAcceleration` of the accelerated pipeline
      call in progress (its denoiser runs diffrt's variant only inside that call).
    """

    attention: Any = None
    int8: Any = None
    step_cache: Any = None
    early_exit: Any = None
    pipeline: Any = None


SWITCHES = tuple(f.name for f in dataclasses.fields(CallContext))

_CURRENT: contextvars.ContextVar[CallContext] = contextvars.ContextVar("diffrt_call_context", default=CallContext())


def current() -> CallContext:
    """The switches of the call in progress (all None outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def switches(**changes: Any) -> Iterator[CallContext]:
    """Set the named switches (the others keep their values) until the block ends; yields the new context."""
    unknown = set(changes) - set(SWITCHES)
    if unknown:
        raise TypeError(f"unknown call-context switch(es) {', '.join(sorted(unknown))}; known: {', '.join(SWITCHES)}")
    updated = dataclasses.replace(_CURRENT.get(), **changes)
    token = _CURRENT.set(updated)
    try:
        yield updated
    finally:
        _CURRENT.reset(token)
