"""The sampler's own cost per step, against diffusers' ``scheduler.step`` loop, in one run.

    python -m diffrt.bench.bench_sampler --out DIR [--device cuda|cpu] [--quick]

The model is free (:class:`ZeroCostModel` returns one preallocated random prediction), so what
is timed is the loop itself: diffrt's model-input scaling, launcher and fused solver-step kernel,
or diffusers' ``scale_model_input`` + ``step``. Cases: solvers ddim, euler, dpmpp-2m, unipc
(those registered; others are skipped with a note) x shapes SD1.5 latent [2, 4, 64, 64] and a
video latent [16, 4, 60, 104], fp32, on an SD1.5 scheduler config. Variants per case:

* ``diffusers``     the canonical loop (``set_timesteps`` runs before each repeat, untimed).
* ``diffrt-eager``  ``Sampler.sample(noise, check=False)``, once per available backend.
* ``diffrt-graph``  the whole ``sample()`` captured in one CUDA graph, replayed (CUDA only).

Before timing, each variant's final sample is compared with diffusers' on the same noise
(``rel_err`` = max|ours - diffusers| / max|diffusers|, must be <= 1e-5). Reported per step:
median, p20, p80 microseconds; speedup over diffusers; host syncs per step (CUDA); and on GPU
``floor_us``, the time to read x and the prediction and write x at the measured copy bandwidth,
and ``goal``: met when a diffrt variant takes under 15 us and no host sync per step.
The JSON (``<gpu-or-cpu>-<yyyymmdd>-sampler.json``) is written through :mod:`diffrt.bench.harness`.
Exit status 1 when a variant errs or misses the parity tolerance.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import harness

log = logging.getLogger("bench.sampler")

TOPIC = "sampler"
TOL = 1e-5
GOAL_US = 15.0  # the sampler's target on GPU: under 15 us and zero host syncs per step
SOLVERS = ("ddim", "euler", "dpmpp-2m", "unipc")
SHAPES = {"sd15": (2, 4, 64, 64), "video": (16, 4, 60, 104)}
QUICK_SHAPES = {"tiny": (2, 4, 8, 8)}
# Stable Diffusion 1.5's scheduler config (the keys a class does not take are dropped).
SD15_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
               "set_alpha_to_one": False, "steps_offset": 1}


class ZeroCostModel:
    """A model that costs nothing: returns its preallocated ``prediction`` whatever the input."""

    def __init__(self, prediction: torch.Tensor):
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, t: Any, cond: Any = None) -> torch.Tensor:
        return self.prediction


@dataclass
class Case:
    """One solver at one shape: the diffusers scheduler class and config, noise and the model."""

    solver: str
    shape_name: str
    shape: tuple[int, ...]
    steps: int
    device: torch.device
    scheduler_cls: type
    config: dict
    noise: torch.Tensor
    model: ZeroCostModel

    def scheduler(self) -> Any:
        """A fresh diffusers scheduler of the case's class and config."""
        return self.scheduler_cls(**self.config)

    def base_row(self) -> dict[str, Any]:
        return {"solver": self.solver, "scheduler": self.scheduler_cls.__name__, "shape_name": self.shape_name,
                "shape": "x".join(map(str, self.shape)), "steps": self.steps, "device": self.device.type,
                "dtype": "float32"}


def make_case(solver: str, shape_name: str, shape: tuple[int, ...], steps: int, device: torch.device) -> Case:
    """Build a case; raises LookupError (with the note to print) when the solver cannot be run."""
    import diffusers  # noqa: PLC0415 - the baseline; imported where it is needed
    from diffrt.runtime.solvers import PRESETS  # noqa: PLC0415

    if solver not in PRESETS:
        raise LookupError(f"solver {solver!r} is not registered in diffrt (registered: {', '.join(sorted(PRESETS))})")
    class_name, overrides = PRESETS[solver]
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None:
        raise LookupError(f"diffusers {diffusers.__version__} has no {class_name}")
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    config = {k: v for k, v in {**SD15_CONFIG, **overrides}.items() if k in accepted}
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=gen).to(device)
    prediction = torch.randn(shape, generator=gen).to(device)
    return Case(solver, shape_name, shape, steps, device, scheduler_cls, config, noise, ZeroCostModel(prediction))


def diffusers_loop(scheduler: Any, model: Callable, noise: torch.Tensor) -> torch.Tensor:
    """The canonical diffusers loop over ``scheduler.timesteps`` (set_timesteps already called)."""
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have neither
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x if scale is None else scale(x, t), t), t, x).prev_sample
    return x


def make_sampler(case: Case, backend: str):
    """diffrt's sampler reproducing the case's scheduler, on ``backend``."""
    from diffrt.runtime import Denoiser, NoiseSchedule, Sampler  # noqa: PLC0415

    scheduler = case.scheduler()
    den = Denoiser(case.model, NoiseSchedule.from_config(scheduler.config), sample_shape=case.shape[1:])
    return Sampler.from_scheduler(den, scheduler, case.steps, backend=backend)


def capture_graph(sampler: Any, noise: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """Capture ``sampler.sample`` in one CUDA graph; returns (graph, static noise, static output).

    ``check=False`` skips sample()'s NaN scan, the one host sync it does (not allowed in capture).
    """
    static_noise = noise.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sampler.sample(static_noise, check=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sampler.sample(static_noise, check=False)
    return graph, static_noise, static_out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref| in fp64 (inf when either is non-finite)."""
    if not (torch.isfinite(ours).all() and torch.isfinite(ref).all()):
        return math.inf
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def time_variant(fn: Callable[[], Any], case: Case, args: argparse.Namespace,
                 setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Timing columns (per-step microseconds) and host syncs per step of one variant."""
    timing = harness.measure(fn, case.device, warmup=args.warmup, repeats=args.repeats, setup=setup,
                             max_seconds=args.max_seconds)
    stats = timing.stats(scale=1e6 / case.steps)
    if setup is not None:
        setup()
    with harness.HostSyncCounter(case.device) as syncs:
        fn()
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
    per_step = None if syncs.count is None else syncs.count / case.steps
    return {"us_per_step": stats["median"], "p20_us": stats["p20"], "p80_us": stats["p80"], "p99_us": stats["p99"],
            "min_us": stats["min"], "repeats": stats["count"], "sample_ms": stats["median"] * case.steps / 1e3,
            "host_syncs_per_sample": syncs.count, "host_syncs_per_step": per_step}


def run_case(case: Case, backends: list[str], args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """All variants of one case: parity first, then timing. Rows carry status ok / parity-fail / error."""
    scheduler = case.scheduler()
    reset = lambda: scheduler.set_timesteps(case.steps, device=case.device)  # noqa: E731
    reset()
    reference = diffusers_loop(scheduler, case.model, case.noise)
    base = {**case.base_row(), "variant": "diffusers", "backend": "-", "rel_err": None, "status": "ok"}
    rows = [{**base, **time_variant(lambda: diffusers_loop(scheduler, case.model, case.noise), case, args, reset)}]
    for backend in backends:
        rows += diffrt_rows(case, backend, reference, args, notes)
    baseline = rows[0]["us_per_step"]
    for row in rows:
        if row.get("us_per_step"):
            row["speedup_vs_diffusers"] = baseline / row["us_per_step"]
            if case.device.type == "cuda" and row["variant"] != "diffusers":
                row["meets_goal"] = row["host_syncs_per_step"] == 0 and row["us_per_step"] < GOAL_US
            if args.peak_gbs:
                row["floor_us"] = 3 * case.noise.numel() * 4 / (args.peak_gbs * 1e3)
    return rows


def diffrt_rows(case: Case, backend: str, reference: torch.Tensor, args: argparse.Namespace,
                notes: list[str]) -> list[dict[str, Any]]:
    """diffrt's eager loop (and on CUDA its whole-loop graph) on one backend: parity, then timing."""
    from diffrt.kernels import BackendUnavailable  # noqa: PLC0415

    where = f"{case.solver} {case.shape_name} backend {backend}"
    error_row = {**case.base_row(), "backend": backend, "status": "error"}
    try:
        sampler = make_sampler(case, backend)
        eager_out = sampler.sample(case.noise)
    except BackendUnavailable as error:
        notes.append(f"{where}: skipped: {error}")
        return []
    except Exception as error:  # noqa: BLE001 - record, go on with the next backend
        log.exception("%s failed", where)
        notes.append(f"{where}: error: {type(error).__name__}: {error}")
        return [{**error_row, "variant": "diffrt-eager", "note": f"{type(error).__name__}: {error}"}]
    rows: list[dict[str, Any]] = []
    variants = [("diffrt-eager", eager_out, lambda: sampler.sample(case.noise, check=False))]
    if case.device.type == "cuda":
        try:
            graph, _, static_out = capture_graph(sampler, case.noise)
            graph.replay()
            variants.append(("diffrt-graph", static_out.clone(), graph.replay))
        except RuntimeError as error:
            log.exception("%s: graph capture failed", where)
            notes.append(f"{where}: graph capture failed: {error}")
            rows.append({**error_row, "variant": "diffrt-graph", "note": str(error)})
    for variant, out, fn in variants:
        err = rel_err(out, reference)
        status = "ok" if err <= TOL else "parity-fail"
        if status != "ok":
            log.error("%s %s: rel_err %.3g > %g", where, variant, err, TOL)
        rows.append({**case.base_row(), "variant": variant, "backend": backend, "rel_err": err,
                     "status": status, **time_variant(fn, case, args)})
    return rows


def default_backends(device: torch.device) -> list[str]:
    return ["reference", "cuda"] if device.type == "cuda" else ["reference", "cpu"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_sampler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON (bench/results for the record)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 5 steps, few repeats (smoke test)")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated preset names")
    parser.add_argument("--backends", default=None, help="comma-separated (default: reference + the device's kernel)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated names of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cap on one variant's timed repeats")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats or (5 if args.quick else 30)
    return args


COLUMNS = [("solver", lambda r: r["solver"]), ("shape", lambda r: r["shape"]), ("variant", lambda r: r["variant"]),
           ("backend", lambda r: r["backend"]), ("us/step", lambda r: r.get("us_per_step")),
           ("p20", lambda r: r.get("p20_us")), ("p80", lambda r: r.get("p80_us")),
           ("x diffusers", lambda r: r.get("speedup_vs_diffusers")),
           ("syncs/step", lambda r: r.get("host_syncs_per_step")), ("floor_us", lambda r: r.get("floor_us")),
           ("rel_err", lambda r: r.get("rel_err")), ("status", lambda r: r["status"]),
           ("goal", lambda r: {True: "met", False: "missed"}.get(r.get("meets_goal")))]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; 1 when a variant errs or misses parity."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {name: {**SHAPES, **QUICK_SHAPES}[name] for name in args.shapes.split(",")}
    backends = args.backends.split(",") if args.backends else default_backends(device)
    stamp = harness.environment_stamp(str(device))
    args.peak_gbs = harness.measure_copy_bandwidth(device) if device.type == "cuda" and not args.quick else None
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with torch.no_grad():
        for solver in args.solvers.split(","):
            for shape_name, shape in shapes.items():
                try:
                    case = make_case(solver, shape_name, shape, args.steps, device)
                except LookupError as error:
                    notes.append(f"{solver}: skipped: {error}")
                    break
                log.info("%s %s %s", solver, shape_name, "x".join(map(str, shape)))
                try:
                    rows += run_case(case, backends, args, notes)
                except Exception as error:  # noqa: BLE001 - record, go on with the next case
                    log.exception("%s %s failed", solver, shape_name)
                    rows.append({**case.base_row(), "variant": "-", "backend": "-", "status": "error",
                                 "note": f"{type(error).__name__}: {error}"})
    path = harness.write_results(args.out, TOPIC, rows, stamp,
                                 extra={"notes": notes, "peak_copy_gbs": args.peak_gbs, "tolerance": TOL,
                                        "args": {k: v for k, v in vars(args).items() if k != "out"}})
    where = stamp.get("gpu_name") or stamp.get("cpu_model")
    print(f"\nsampler cost per step, {args.steps} steps, fp32, zero-cost model, on {where} (torch {stamp['torch']})")
    print(harness.format_table(rows, COLUMNS))
    for note in notes:
        print("note:", note)
    if args.peak_gbs:
        print(f"measured copy bandwidth: {args.peak_gbs:.0f} GB/s (floor_us = read x + prediction, write x)")
    print(f"wrote {path}")
    return 0 if rows and all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
