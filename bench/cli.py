"""``diffrt bench`` and ``diffrt tune``: their arguments and commands (the ``diffrt`` entry point,
:mod:`diffrt.runtime.cli`, adds them with :func:`add_commands`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from diffrt.runtime.solvers import PRESETS

from . import harness, zoo

log = logging.getLogger("diffrt")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` and ``tune`` sub-commands to the ``diffrt`` parser."""
    p = sub.add_parser("bench", help="latency of a model under the baselines and diffrt's configurations, side by side")
    _workload_arguments(p)
    p.add_argument("--batch", type=int, default=1, help="samples per call (CFG doubles the model batch)")
    p.add_argument("--configs", default="all", help="comma-separated: diffusers-eager, diffusers-compile, "
                   "streamdiffusion, exact, graphs, todo, sparse, int8, adaptive-guidance, early-exit, step-cache, "
                   "combined; or all")
    p.add_argument("--config", default=None, help="an acceleration config (diffrt tune's JSON): adds a 'tuned' row")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="baseline and diffrt dtype (default: fp16 on "
                   "CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed samples per configuration")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on one configuration's timed repeats")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compile baseline (default: "
                   "reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON and the chart")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--serial", action="store_true", help="time each configuration right after building it and free "
                   "it before the next (less GPU memory; default: all built, timed in interleaved rounds)")
    p.add_argument("--pipeline", action="store_true", help="the model inside its real diffusers pipeline class: "
                   "diffusers eager and torch.compile vs accelerate(pipe), whole pipeline calls "
                   "(sd15-unet, sd-turbo-stream, sdxl-unet, dit-xl-2, flux-like)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("tune", help="the fastest configuration whose samples stay within a quality floor")
    _workload_arguments(p)
    p.add_argument("--quality-floor", type=float, default=30.0, help="mean PSNR (dB) vs the fp32 reference")
    p.add_argument("--batch", type=int, default=4, help="samples per call: the tuning seeds' batch")
    p.add_argument("--axes", default=None, help="comma-separated subset of attention, graphs, steps, int8, todo, "
                   "sparse, adaptive-guidance, early-exit, step-cache (default: all, in that order)")
    p.add_argument("--space", default="default", choices=["default", "quick"], help="quick: fewer values per axis")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per candidate")
    p.add_argument("--out", default="tuned.json", help="the config file (an INT8 calibration is saved beside it)")
    p.set_defaults(func=cmd_tune)


def _device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return device


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark one model: baselines and diffrt configurations; table, JSON and chart."""
    from . import benchmark  # noqa: PLC0415 - the parser stays light for the other commands

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = zoo.workload(args.model, device, args.resolution, tiny=args.tiny)
    if args.pipeline:
        from . import pipeline_bench  # noqa: PLC0415

        if args.solver:
            raise ValueError("--pipeline runs the pipeline's own scheduler class; --solver does not apply")
        workload.steps = args.steps or workload.steps
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        result = pipeline_bench.run(workload, batch=args.batch, configs=configs,
                                    dtype=DTYPES[args.dtype] if args.dtype else None,
                                    tuned=args.config, warmup=args.warmup, repeats=args.repeats,
                                    max_seconds=args.max_seconds, compile_mode=args.compile_mode, seed=args.seed,
                                    progress=not args.quiet)
        return _report(args, device, result)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result = benchmark.run(workload, batch=args.batch, configs=configs, steps=args.steps, solver=args.solver,
                           dtype=DTYPES[args.dtype] if args.dtype else None, tuned=args.config, warmup=args.warmup,
                           repeats=args.repeats, max_seconds=args.max_seconds, compile_mode=args.compile_mode,
                           seed=args.seed, progress=not args.quiet, interleave=not args.serial)
    return _report(args, device, result)


def _report(args: argparse.Namespace, device: torch.device, result: dict) -> int:
    """Table, stamped JSON and chart of a bench result; exit code 1 when a row failed."""
    from . import report  # noqa: PLC0415

    stamp = harness.environment_stamp(str(device))
    path = report.write_json(args.out, result, stamp)
    print(report.table(result))
    print(f"wrote {path}")
    if not args.no_chart:
        png = report.chart(result, Path(path).with_suffix(".png"), stamp)
        if png is not None:
            print(f"wrote {png}")
    failed = [r["config"] for r in result["rows"] if r["status"] in ("error", "quality-fail")]
    if failed:
        log.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the fastest configuration within --quality-floor; write it as JSON."""
    from . import tune  # noqa: PLC0415

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = zoo.workload(args.model, device, args.resolution, tiny=args.tiny)
    if args.steps or args.solver:
        workload.steps, workload.solver = args.steps or workload.steps, args.solver or workload.solver
    axes = tuple(a.strip().replace("-", "_") for a in args.axes.split(",")) if args.axes else tune.AXES
    out = Path(args.out)
    result = tune.tune(workload, args.quality_floor, batch=args.batch, axes=axes, space=args.space,
                       dtype=DTYPES[args.dtype] if args.dtype else None, repeats=args.repeats,
                       calibration_dir=out.parent, progress=not args.quiet)
    path = tune.save(result, out, workload, harness.environment_stamp(str(device)))
    columns = [("axis", lambda t: t.axis), ("configuration", lambda t: t.acceleration.describe()),
               ("latency ms", lambda t: t.latency), ("PSNR dB", lambda t: t.psnr_db), ("verdict", lambda t: t.verdict)]
    print(f"diffrt tune: {workload.name}, batch {args.batch}, floor {args.quality_floor:g} dB mean PSNR vs the fp32 "
          f"reference ({workload.solver} {workload.steps} steps), {len(result.trials)} trials in {result.seconds:.0f} s")
    print(harness.format_table(result.trials, columns))
    best = result.best
    print(f"chosen: {best.acceleration.describe()}: {best.latency:.2f} ms, {result.speedup:.2f}x the exact "
          f"configuration, {best.psnr_db:.1f} dB (min {best.psnr_min_db:.1f})")
    print(f"wrote {path} (optimize(den, config={str(path)!r}); diffrt bench --config {path})")
    return 0


def _workload_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --resolution, --steps, --solver, --device, --seed, --threads, --quiet (bench and tune)."""
    p.add_argument("--model", required=True, help=f"{', '.join(zoo.NAMES)}, or a diffusers model folder")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the model's, e.g. 20)")
    p.add_argument("--solver", default=None, choices=sorted(PRESETS), help="default: the model's (dpmpp-2m mostly)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="the noise and conditions' seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tiny", action="store_true", help="the model family at toy sizes (CPU smoke tests; not a speed "
                   "measurement)")
