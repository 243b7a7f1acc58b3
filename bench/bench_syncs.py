"""Blocking host syncs, host-to-device copies and host cost per step, diffrt against diffusers' loops (issue 19).

    python -m diffrt.bench.bench_syncs --out DIR [--quick] [--steps N] [--threads 1]

Counted on CPU with the residency emulation (:mod:`diffrt.runtime.residency`: a value lives on the
"device" when it was put there, created there or computed from such values; a blocking read of one,
or a blocking copy to it, is what a GPU run would wait for):

* **solvers**: every preset, diffusers' own ``scheduler.step`` loop (``set_timesteps(device=...)``, as
  pipelines call it) against diffrt's Sampler reproducing it (``from_scheduler``, the C++ step), with the
  zero-cost model of :mod:`diffrt.bench.bench_sampler` on a tiny latent [2, 4, 8, 8], no CFG: syncs and
  copies per step (per ``scheduler.step`` / ``Sampler.step`` call), and the host cost in microseconds per
  step (the emulation off; divided by the number of inference steps, as bench_sampler does);
* **adaptive features**: the digits DiT, DPM++ 2M, CFG 3, a batch of ``--batch`` (no diffusers peer):
  per step of the plain loop, adaptive guidance, LinearAG, early exit (per sample, whole batch,
  segment graphs), the step cache, stochastic solvers with a CPU generator (their copies are in
  ``start()``); per tick of StreamPipeline (device or Python-int conditions, the similarity filter,
  the deadline policy, whose ``torch.cuda.synchronize`` behind a device-type branch is probed apart and
  added). ``where`` names the lines that sync or copy.

Counts are taken after one warm-up call (caches filled, as before a graph capture), without the
input checks of ``sample(check=True)``. ``--before FILE`` puts the counts of an earlier run (e.g. of the
last commit) beside each row. The JSON (``cpu-<yyyymmdd>-syncs.json``) is written through
:mod:`diffrt.bench.harness`. Exit status 1 when a row errs.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import unittest.mock
from pathlib import Path
from typing import Any, Callable

import torch
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler, models, optimize
from diffrt.runtime.deadline import DeadlinePolicy
from diffrt.runtime.linear_ag import LinearAG, default_estimated_steps
from diffrt.runtime.residency import count_calls, count_sampling, emulated_device
from diffrt.runtime.solvers import PRESETS
from diffrt.runtime.stream import StreamPipeline

from . import harness
from .bench_sampler import ZeroCostModel, diffusers_loop, make_case, make_sampler, time_variant

log = logging.getLogger("bench.syncs")

TOPIC = "syncs"
SHAPE = (2, 4, 8, 8)  # tiny: the host cost of a step, not its arithmetic


# ---------------------------------------------------------------------------------------------- configurations

def put_on_device(dev, den) -> None:
    """The denoiser's weights (and exit heads, kept out of the DiT's modules) on the emulated device."""
    dev.to_device(den.model)
    if getattr(den.model, "exit_heads", None) is not None:
        dev.to_device(den.model.exit_heads)


def sampling_counts(den, solver: str = "dpmpp-2m", steps: int = 3, batch: int = 2, guidance_scale=3.0,
                    generator=None, make: Callable | None = None, **options):
    """:class:`~diffrt.runtime.residency.SamplingCounts` of a digits-DiT-shaped run: ``make(den)`` (e.g. an
    optimized denoiser) and the Sampler built inside the emulation, device noise and class labels."""

    with emulated_device() as dev:
        put_on_device(dev, den)
        den = make(den) if make is not None else den
        noise = dev.to_device(torch.randn(batch, *den.sample_shape, generator=torch.Generator().manual_seed(0)))
        cond = dev.to_device(torch.arange(batch) % 10)
        uncond = dev.to_device(torch.full((batch,), models.NULL_CLASS)) if guidance_scale else None
        sampler = Sampler(den, solver, steps, guidance_scale=guidance_scale, **options)
        return count_sampling(dev, sampler, noise, cond=cond, uncond=uncond, generator=generator, check=False)


def tick_counts(den, cond: Any = None, frames: int = 3, warmup: int = 2, **options):
    """(Counts per tick, events) of a two-stage StreamPipeline fed distinct device frames after ``warmup``
    ticks; ``cond`` None: a device tensor (label 3), else as given (e.g. a Python int)."""

    with emulated_device() as dev:
        put_on_device(dev, den)
        cond = dev.to_device(torch.tensor(3)) if cond is None else cond
        pipe = StreamPipeline(den, t_index_list=(32, 45), cond=cond, device=dev.device, **options)
        shape = (1, *den.sample_shape[1:])
        images = [dev.to_device(torch.rand(shape, generator=torch.Generator().manual_seed(i)) * 2 - 1)
                  for i in range(warmup + frames)]
        return count_calls(dev, lambda i: pipe.tick(images[i]), frames, warmup)


def adaptive_configurations(den, steps: int, batch: int) -> dict[str, tuple[str, Callable[[], tuple]]]:
    """name -> (its setting, a function returning (unit: "step" or "tick", Counts per unit, start() Counts or
    None, events))."""
    def sampling(solver: str = "dpmpp-2m", guidance_scale=3.0, **options):
        def run():
            counts = sampling_counts(den, solver, steps, batch, guidance_scale, **options)
            return "step", counts.per_step, counts.start, counts.events
        return f"{solver}, {steps} steps, batch {batch}, CFG {guidance_scale or 'off'}", run

    def ticks(**options):
        def run():
            per_tick, events = tick_counts(den, **options)
            return "tick", per_tick, None, events
        return "StreamPipeline, LCM stages (32, 45), one frame per tick", run

    plan = Sampler(den, "dpmpp-2m", steps).plan
    cpu_generator = torch.Generator().manual_seed(1)
    linear_ag = LinearAG.for_plan(torch.tensor([[1.0, 0.0, 0.0, 0.0]] * steps), default_estimated_steps(steps), plan)
    return {
        "plain, CFG": sampling(),
        "plain, no CFG": sampling(guidance_scale=None),
        "adaptive guidance (default)": sampling(adaptive_guidance=True),
        "LinearAG": sampling(linear_ag=linear_ag),
        "LinearAG + adaptive guidance": sampling(linear_ag=linear_ag, adaptive_guidance=True),
        "early exit, per sample": sampling(early_exit=True),
        "early exit, whole batch": sampling(early_exit=True, early_exit_scope="batch"),
        "early exit, segment graphs": sampling(early_exit=True, early_exit_graphs=True),
        "step cache (0.1)": sampling(make=lambda d: optimize(d, step_cache=0.1)),
        "dpmpp-2m-sde, CPU generator": sampling(solver="dpmpp-2m-sde", generator=cpu_generator),
        "euler-ancestral, CPU generator": sampling(solver="euler-ancestral", generator=cpu_generator),
        "stream tick, device cond": ticks(),
        "stream tick, Python-int cond, full CFG": ticks(cond=3, uncond=models.NULL_CLASS, cfg_type="full",
                                                         guidance_scale=2.0),
        "stream tick, similarity filter": ticks(similarity_threshold=0.98),
        "stream tick, deadline policy": ticks(deadline=DeadlinePolicy(budget_ms=1e9)),
    }


class _CudaPipe:
    """What DeadlinePolicy.observe reads of a StreamPipeline running on CUDA."""

    def __init__(self, den):
        self.device, self.den = torch.device("cuda"), den
        self.cfg_type, self.similarity_threshold, self.early_exit = "none", None, None


def deadline_cuda_synchronizations(den, ticks: int = 3) -> float:
    """``torch.cuda.synchronize`` calls per tick of a DeadlinePolicy observing a pipeline on CUDA: a device-type
    branch the emulation does not take, probed with the call patched out (no GPU needed)."""
    calls = []
    policy = DeadlinePolicy(budget_ms=1e9)
    with unittest.mock.patch.object(torch.cuda, "synchronize", lambda device=None: calls.append(device)):
        for _ in range(ticks):
            policy.observe(_CudaPipe(den), 0.0)
    return len(calls) / ticks


def where(events, section: str | None = None, top: int = 4) -> str:
    """The most frequent (kind, op, line) of ``events`` in ``section``, "3x syncs tolist at file:line"."""
    counter = collections.Counter((e.kind, e.op, e.where) for e in events if section is None or e.section == section)
    return "; ".join(f"{n}x {kind} {op} at {line}" for (kind, op, line), n in counter.most_common(top))


# ---------------------------------------------------------------------------------------------- solver rows

def solver_rows(solver: str, args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """diffusers' loop and diffrt's sampler for one preset: counts (emulated) and host cost (plain CPU)."""
    case = make_case(solver, "tiny", SHAPE, args.steps, torch.device("cpu"))
    scheduler, sampler = case.scheduler(), make_sampler(case, "cpu")
    variants = {  # name: (the timed run, what runs before each timed run)
        "diffusers": (lambda: diffusers_loop(scheduler, case.model, case.noise),
                      lambda: scheduler.set_timesteps(case.steps, device=case.device)),
        "diffrt": (lambda: sampler.sample(case.noise, check=False), None),
    }
    rows = []
    for variant, (run, setup) in variants.items():
        row = {**case.base_row(), "kind": "solver", "config": solver, "unit": "step", "variant": variant,
               "status": "ok"}
        try:
            row.update(solver_counts(case, variant))
            timing = time_variant(run, case, args, setup)
            row.update({k: v for k, v in timing.items() if not k.startswith("host_syncs")})  # CUDA-only columns
        except Exception as error:  # noqa: BLE001 - record, go on with the next variant
            log.exception("%s %s failed", solver, variant)
            notes.append(f"{solver} {variant}: error: {type(error).__name__}: {error}")
            row.update(status="error", note=f"{type(error).__name__}: {error}")
        rows.append(row)
    if all(r.get("us_per_step") for r in rows):
        rows[1]["speedup_vs_diffusers"] = rows[0]["us_per_step"] / rows[1]["us_per_step"]
    return rows


def solver_counts(case, variant: str) -> dict[str, Any]:
    """The count columns of ``variant`` ("diffusers" or "diffrt") of a bench_sampler case, emulated."""
    count = {"diffusers": _count_diffusers, "diffrt": _count_diffrt}[variant]
    with emulated_device() as dev:
        model = ZeroCostModel(dev.to_device(case.model.prediction))
        setup, loop, steps, events = count(dev, case, model)
    per_step = loop.per(steps)
    return {"syncs_per_step": per_step.syncs, "h2d_per_step": per_step.h2d, "d2h_async_per_step": per_step.d2h_async,
            "setup_syncs": setup.syncs, "setup_h2d": setup.h2d, "counted_steps": steps,
            "where": where(events, "loop"), "where_setup": where(events, "setup")}


def _count_diffusers(dev, case, model):
    """diffusers' loop: set_timesteps on the device (setup), then every ``scheduler.step`` (after a warm-up run)."""
    scheduler = case.scheduler()
    noise = dev.to_device(case.noise)
    with dev.section("warmup"):
        scheduler.set_timesteps(case.steps, device=dev.device)
        diffusers_loop(scheduler, model, noise)
    first = len(dev.events)
    with dev.section("setup"):
        scheduler.set_timesteps(case.steps, device=dev.device)
    with dev.section("loop"):
        diffusers_loop(scheduler, model, noise)
    events = dev.events[first:]
    return dev.counts("setup"), dev.counts("loop"), len(scheduler.timesteps), events


def _count_diffrt(dev, case, model):
    """diffrt's sampler reproducing the case's scheduler, counted by :func:`count_sampling`."""
    scheduler = case.scheduler()
    den = Denoiser(model, NoiseSchedule.from_config(scheduler.config), sample_shape=case.shape[1:])
    sampler = Sampler.from_scheduler(den, scheduler, case.steps, backend="cpu")
    counts = count_sampling(dev, sampler, dev.to_device(case.noise), check=False)
    return counts.setup, counts.loop, counts.steps, counts.events


# ---------------------------------------------------------------------------------------------- main

def adaptive_rows(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """One row per :func:`adaptive_configurations` entry on the digits DiT."""
    den = models.load("digits-dit")
    rows = []
    for name, (setting, run) in adaptive_configurations(den, args.adaptive_steps, args.batch).items():
        row = {"kind": "adaptive", "config": name, "variant": "diffrt", "model": "digits-dit", "setting": setting,
               "status": "ok"}
        log.info("%s", name)
        try:
            unit, per_unit, start, events = run()
            row.update(unit=unit, syncs_per_step=per_unit.syncs, h2d_per_step=per_unit.h2d,
                       d2h_async_per_step=per_unit.d2h_async,
                       where=where(events, "loop" if unit == "step" else "calls"))
            if start is not None:
                row.update(start_syncs=start.syncs, start_h2d=start.h2d, where_start=where(events, "start"))
        except Exception as error:  # noqa: BLE001 - record, go on with the next configuration
            log.exception("%s failed", name)
            notes.append(f"{name}: error: {type(error).__name__}: {error}")
            row.update(status="error", note=f"{type(error).__name__}: {error}")
        if "deadline" in name and row["status"] == "ok":
            row["cuda_synchronize_per_tick"] = deadline_cuda_synchronizations(den)
            row["syncs_per_step"] += row["cuda_synchronize_per_tick"]
        rows.append(row)
    return rows


def add_before(rows: list[dict[str, Any]], path: str) -> None:
    """Put the counts of the same (config, variant) rows of an earlier run beside each row: ``before_*``."""
    document = json.loads(Path(path).read_text())
    earlier = {(r["config"], r["variant"]): r for r in document["rows"] if r.get("status") == "ok"}
    for row in rows:
        match = earlier.get((row["config"], row["variant"]))
        if match is not None:
            stamp = match["stamp"]
            row.update({f"before_{key}": match.get(key) for key in BEFORE_KEYS}, before_where=match.get("where"),
                       before_source=stamp.get("git_sha") or f"source hash {stamp.get('source_hash')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_syncs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON (bench/results for the record)")
    parser.add_argument("--quick", action="store_true", help="5 steps, 4 presets, few repeats (smoke test)")
    parser.add_argument("--solvers", default=None, help="comma-separated presets (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="solver rows' inference steps (default 20; 5 quick)")
    parser.add_argument("--adaptive-steps", type=int, default=None, help="adaptive rows' steps (default 20; 4 quick)")
    parser.add_argument("--batch", type=int, default=None, help="adaptive rows' batch (default 8; 2 quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (host cost: one core)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="cap on one variant's timed repeats")
    parser.add_argument("--before", default=None, help="an earlier syncs JSON (e.g. of the last commit): its counts "
                                                       "go beside this run's as the 'before' columns")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.adaptive_steps = args.adaptive_steps or (4 if args.quick else 20)
    args.batch = args.batch or (2 if args.quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats or (3 if args.quick else 30)
    return args


BEFORE_KEYS = ("syncs_per_step", "h2d_per_step", "start_h2d")
QUICK_SOLVERS = ("ddim", "dpmpp-2m", "unipc", "euler-ancestral")
COLUMNS = [("config", lambda r: r["config"]), ("variant", lambda r: r["variant"]), ("per", lambda r: r.get("unit")),
           ("syncs", lambda r: r.get("syncs_per_step")), ("before", lambda r: r.get("before_syncs_per_step")),
           ("h2d", lambda r: r.get("h2d_per_step")), ("before ", lambda r: r.get("before_h2d_per_step")),
           ("us/step", lambda r: r.get("us_per_step")), ("x diffusers", lambda r: r.get("speedup_vs_diffusers")),
           ("start h2d", lambda r: r.get("start_h2d")), ("before  ", lambda r: r.get("before_start_h2d")),
           ("status", lambda r: r["status"]),
           ("where", lambda r: (r.get("where") or "")[:110])]


def main(argv: list[str] | None = None) -> int:
    """Count and time every row, print the table, write the JSON; 1 when a row errs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stamp = harness.environment_stamp("cpu")
    solvers = args.solvers.split(",") if args.solvers else list(QUICK_SOLVERS if args.quick else sorted(PRESETS))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with torch.no_grad():
        for solver in solvers:
            log.info("%s", solver)
            try:
                rows += solver_rows(solver, args, notes)
            except LookupError as error:
                notes.append(f"{solver}: skipped: {error}")
        rows += adaptive_rows(args, notes)
    for row in rows:
        row.setdefault("unit", "step")
    if args.before:
        add_before(rows, args.before)
    path = harness.write_results(args.out, TOPIC, rows, stamp, extra={
        "notes": notes, "shape": list(SHAPE), "args": {k: v for k, v in vars(args).items() if k != "out"},
        "method": "residency emulation (diffrt.runtime.residency) on CPU; host cost with the emulation off"})
    print(f"\nblocking syncs / host-to-device copies per step (emulated device residency, CPU) and host cost; "
          f"solvers: zero-cost model {'x'.join(map(str, SHAPE))}, {args.steps} steps; adaptive: digits DiT, "
          f"dpmpp-2m {args.adaptive_steps} steps, batch {args.batch}, CFG 3 (torch {stamp['torch']}, "
          f"{args.threads} thread)")
    print(harness.format_table(rows, COLUMNS))
    for note in notes + [f"{r['config']}: {r['note']}" for r in rows if r.get("note") and r["status"] == "ok"]:
        print("note:", note)
    print(f"wrote {path}")
    return 0 if rows and all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
