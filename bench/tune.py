"""``diffrt tune``: the fastest combination of accelerations whose samples stay within a quality floor.

Quality is the mean PSNR (dB) of a candidate's samples against the fp32 reference (the diffusers
loop on the fp32 model at the workload's solver and steps) on the tuning seeds' noise; speed is
the candidate's median latency measured on this device (``latency=`` swaps in another cost, e.g.
a count of model evaluations). Both are measured for every candidate, on the combination it
would join, so the floor holds for the configuration returned, not for its parts one by one.

The search is greedy and pruned. Starting from the exact configuration (diffrt's kernels, the
benchmark dtype), it walks the :data:`AXES` in order; along an axis the values run from mild to
aggressive, a value is kept when it meets the floor and is at least ``min_gain`` faster than the
best so far, and the axis stops at the first value below the floor (a more aggressive value of
the same knob would be further below). Axes that cannot apply (graphs off CUDA, early exit
without exit heads, guidance options without CFG) are skipped; sparse attention is tried only when
ToDo was not kept (both act on the same layers).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffrt.runtime.acceleration import Acceleration

from . import harness
from .benchmark import (
    PENDING,
    Calibrations,
    Inputs,
    cacheable,
    diffusers_sample,
    diffusers_scheduler,
    psnr_db,
    scheduler_options,
)
from .zoo import Workload

log = logging.getLogger(__name__)

AXES = ("attention", "graphs", "steps", "int8", "todo", "sparse", "adaptive_guidance", "early_exit", "step_cache")
TUNE_SEED = 2000
LatencyFn = Callable[[Acceleration, Callable[[], torch.Tensor]], float]


@dataclass
class Trial:
    """One measured candidate: its config, median latency (ms, or the injected cost), PSNR and verdict."""

    axis: str
    acceleration: Acceleration
    latency: float | None = None
    psnr_db: float | None = None
    psnr_min_db: float | None = None
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "acceleration": self.acceleration.describe(), "latency": self.latency,
                "psnr_db": self.psnr_db, "psnr_min_db": self.psnr_min_db, "verdict": self.verdict,
                "config": self.acceleration.to_dict()}


@dataclass
class TuneResult:
    best: Trial
    baseline: Trial
    trials: list[Trial] = field(default_factory=list)
    floor_db: float = 30.0
    seconds: float = 0.0

    @property
    def speedup(self) -> float:
        return self.baseline.latency / self.best.latency if self.best.latency else math.nan

    def summary(self) -> dict[str, Any]:
        return {"quality_floor_db": self.floor_db, "best": self.best.to_dict(), "baseline": self.baseline.to_dict(),
                "speedup_vs_exact": self.speedup, "trials": [t.to_dict() for t in self.trials],
                "search_seconds": self.seconds}


def candidates(axis: str, workload: Workload, device: torch.device, steps: int, space: str) -> list[dict[str, Any]]:
    """The values tried along ``axis``, mild to aggressive, as Acceleration field changes ([] = n/a)."""
    quick = space == "quick"
    model = workload.den.model
    if axis == "attention":
        return [] if quick or device.type != "cuda" else [{"attention": "torch"}]
    if axis == "graphs":
        return [{"cuda_graphs": True}] if device.type == "cuda" else []
    if axis == "steps":
        counts = sorted({max(1, round(steps * f)) for f in ((0.5, 0.25) if quick else (0.75, 0.5, 0.4, 0.25))}
                        - {steps}, reverse=True)
        solvers = [workload.solver] if quick or workload.solver in ("flow-euler", "euler", "ddim") else [workload.solver, "unipc"]
        return [{"solver": s, "steps": n} for n in counts for s in solvers]
    if axis == "int8":
        return [{"int8": {"path": PENDING, "groups": "auto"}}] if isinstance(model, torch.nn.Module) else []
    if axis == "todo":
        finest = str(workload.todo_level)
        levels = ({finest: 2},) if quick else ({finest: 2}, {finest: 2, str(workload.todo_level + 1): 2})
        return [{"todo": {"factor": factor, "min_tokens": workload.todo_tokens}} for factor in levels]
    if axis == "sparse":
        block = workload.sparse_block
        radii = (3, 2) if block < 64 else (16, 8)
        return [{"sparse": {"kind": "window", "radius": r, "q_block": block, "k_block": block,
                            "min_tokens": workload.sparse_tokens}} for r in (radii[-1:] if quick else radii)]
    if axis == "adaptive_guidance":
        return [{"adaptive_guidance": v} for v in ((0.95,) if quick else (0.99, 0.97, 0.95, 0.9))] if workload.guided else []
    if axis == "early_exit":
        heads = getattr(model, "exit_heads", None) is not None
        return [{"early_exit": v} for v in ((0.1, 0.2) if quick else (0.05, 0.1, 0.2, 0.3))] if heads else []
    if axis == "step_cache":
        blocks = cacheable(model)
        return [{"step_cache": v} for v in ((0.1,) if quick else (0.05, 0.1, 0.15))] if blocks else []
    raise ValueError(f"unknown axis {axis!r}; one of {', '.join(AXES)}")


def _conflicts(axis: str, best: Acceleration) -> str | None:
    if axis == "sparse" and best.todo:
        return "ToDo was kept (both act on the same attention layers)"
    if axis == "step_cache" and best.early_exit is not None:
        return "early exit was kept (both skip the same blocks)"
    if axis == "step_cache" and best.cuda_graphs:
        return "graphs were kept (the cache decides on the host per call)"
    return None


def tune(workload: Workload, quality_floor_db: float = 30.0, batch: int = 4, axes: tuple[str, ...] = AXES,
         space: str = "default", latency: LatencyFn | None = None, dtype: torch.dtype | None = None,
         min_gain: float = 0.03, repeats: int = 5, calibration_dir: str | Path | None = None,
         progress: bool = True) -> TuneResult:
    """Search (module docstring); ``space`` "default" or "quick" (fewer values per axis)."""
    if space not in ("default", "quick"):
        raise ValueError(f"space must be 'default' or 'quick', got {space!r}")
    if not math.isfinite(quality_floor_db):
        raise ValueError(f"quality_floor_db must be finite, got {quality_floor_db}")
    began = time.perf_counter()
    device = workload.den.device or torch.device("cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    inputs = Inputs.make(workload, batch, TUNE_SEED)
    with torch.no_grad():
        reference = diffusers_sample(workload.den, diffusers_scheduler(workload, workload.solver), workload.steps,
                                     inputs).float()
    calibrations = Calibrations(workload, batch, calibration_dir, progress=False)
    measure = latency or _timed(device, repeats)

    def evaluate(axis: str, acc: Acceleration) -> Trial:
        trial = Trial(axis, acc)
        try:
            run = _runner(workload, calibrations.resolve(acc, workload.solver, workload.steps), inputs)
            with torch.no_grad():
                out = run()
                if not torch.isfinite(out).all():
                    trial.verdict = "non-finite output"
                    return trial
                trial.psnr_db, trial.psnr_min_db = psnr_db(out.float(), reference, workload.data_range)
                if trial.psnr_db >= quality_floor_db:
                    trial.latency = measure(acc, run)
        except (ValueError, NotImplementedError, RuntimeError) as error:
            trial.verdict = f"error: {type(error).__name__}: {error}"
            log.info("tune: %s: %s", acc.describe(), trial.verdict)
        return trial

    baseline = evaluate("exact", Acceleration(dtype=str(dtype).replace("torch.", "")))
    if baseline.latency is None:
        baseline.verdict = baseline.verdict or (f"the exact configuration is below the floor ({baseline.psnr_db:.1f} dB "
                                                f"< {quality_floor_db:g}): nothing to trade")
        log.warning("tune: %s", baseline.verdict)
        return TuneResult(baseline, baseline, [baseline], quality_floor_db, time.perf_counter() - began)
    baseline.verdict = "start"
    best, trials = baseline, [baseline]
    plan = [(axis, change) for axis in axes for change in candidates(axis, workload, device, workload.steps, space)]
    bar = tqdm(total=len(plan), desc=f"tune {workload.name}", unit="trial", disable=not progress)
    for axis in axes:
        values = candidates(axis, workload, device, workload.steps, space)
        conflict = _conflicts(axis, best.acceleration)
        for index, change in enumerate(values):
            bar.update(1)
            if conflict:
                if index == 0:
                    trials.append(Trial(axis, best.acceleration.replace(**change), verdict=f"skipped: {conflict}"))
                continue
            trial = evaluate(axis, best.acceleration.replace(**change))
            trials.append(trial)
            if trial.verdict:  # an error: this value cannot run, the next may
                continue
            if trial.psnr_db < quality_floor_db:
                trial.verdict = f"below the floor ({trial.psnr_db:.1f} < {quality_floor_db:g} dB): axis pruned"
                conflict = "pruned"
                continue
            if trial.latency < best.latency * (1 - min_gain):
                trial.verdict = f"kept: {best.latency / trial.latency:.2f}x faster than the best so far"
                best = trial
            else:
                trial.verdict = "within the floor but not faster"
        bar.refresh()
    bar.close()
    best.verdict = best.verdict if best is not baseline else "nothing faster within the floor: the exact configuration"
    best.acceleration = calibrations.resolve(best.acceleration, workload.solver, workload.steps)  # the saved path
    return TuneResult(best, baseline, trials, quality_floor_db, time.perf_counter() - began)


def _runner(workload: Workload, acc: Acceleration, inputs: Inputs) -> Callable[[], torch.Tensor]:
    from diffrt.runtime.optimized import optimize  # noqa: PLC0415

    fast = optimize(workload.den, config=acc)
    sampler = acc.sampler(fast, workload.solver, workload.steps, guidance_scale=inputs.guidance_scale,
                          **scheduler_options(workload, acc.solver or workload.solver))
    return lambda: sampler.sample(inputs.noise, cond=inputs.cond, uncond=inputs.uncond, check=False)


def _timed(device: torch.device, repeats: int) -> LatencyFn:
    def measure(acc: Acceleration, run: Callable[[], torch.Tensor]) -> float:
        return harness.measure(run, device, warmup=1, repeats=repeats, max_seconds=30.0).stats(1e3)["median"]
    return measure


def save(result: TuneResult, path: str | Path, workload: Workload, stamp: dict[str, Any]) -> Path:
    """Write the chosen config (its calibration path made relative to the file) with the search record."""
    path = Path(path)
    best = result.best.acceleration
    if isinstance(best.int8, dict):
        calibration = Path(best.int8["path"])
        try:
            relative = calibration.resolve().relative_to(path.parent.resolve())
        except ValueError:
            relative = calibration
        best = best.replace(int8={**best.int8, "path": str(relative)})
    extra = {"workload": workload.summary(), **result.summary(), "stamp": stamp}
    return best.save(path, extra=extra)
