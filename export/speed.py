"""Quantize only where it pays: time every candidate layer in float and in INT8, keep the winners.

INT8 is not faster everywhere (TensorRT and ModelOpt users report INT8 slower than FP16 in many
configurations: small GEMMs, the cost of quantizing activations). :func:`measure_layers` runs one
forward of the denoiser to record each candidate layer's input, then times that layer alone on
its device, float vs W8A8 (per-token scales: the kernel path a calibrated layer runs), and
:func:`speed_policy` turns the measurement into a :class:`~diffrt.export.quant.QuantPolicy` that
excludes the layers whose speed-up is below ``min_speedup``. Timing uses CUDA events on a GPU
and perf_counter on CPU (medians of ``repeats``); it measures, it does not estimate.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from diffrt.runtime import context

from . import quant
from .quant import QuantPolicy


@dataclass
class LayerSpeed:
    name: str
    rows: int
    in_features: int
    out_features: int
    float_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tick) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_layers(den, x: torch.Tensor, t: torch.Tensor, cond: Any = None, policy: QuantPolicy | None = None,
                   repeats: int = 20) -> list[LayerSpeed]:
    """Float vs W8A8 time of each layer ``policy`` would quantize, at the inputs one call ``den(x, t, cond)`` gives it."""
    model = den.model
    modules = dict(model.named_modules())
    names = (policy or QuantPolicy()).select(model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_pre_hook(lambda m, args, n=n: inputs.setdefault(n, args[0].detach()))
               for n in names]
    try:
        den(x, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for name in names:
        if name not in inputs:
            continue  # not called in this forward
        module, layer_input = modules[name], inputs[name]
        device = layer_input.device
        float_ms = _median_ms(lambda: module(layer_input), device, repeats)
        was_patched = quant.is_patched(module)
        quant.patch(module)
        try:
            with context.switches(int8=(None, "dynamic", {module: quant.prepare(module, torch.ones(1))})):
                int8_ms = _median_ms(lambda: module(layer_input), device, repeats)
        finally:
            if not was_patched:
                quant.unpatch(module)
        weight = module.weight
        rows = layer_input.numel() // weight.shape[1] if weight.dim() == 2 else layer_input.numel() // layer_input.shape[1]
        results.append(LayerSpeed(name, rows, weight.shape[1], weight.shape[0], float_ms, int8_ms))
    return results


def speed_policy(speeds: list[LayerSpeed], min_speedup: float = 1.05, base: QuantPolicy | None = None) -> QuantPolicy:
    """``base`` (default policy) with the measured layers slower than ``min_speedup`` x float excluded."""
    base = base or QuantPolicy()
    losers = tuple(s.name for s in speeds if s.speedup < min_speedup)
    return QuantPolicy(keep=base.keep, include=base.include, exclude=base.exclude + losers,
                       keep_first_last=base.keep_first_last)
