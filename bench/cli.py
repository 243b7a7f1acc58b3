"""``diffrt bench`` and ``diffrt tune``: their arguments and commands (the ``diffrt`` entry point,
:mod:`diffrt.runtime.cli`, adds them with :func:`add_commands`), and the argument types every ``diffrt``
sub-command validates its options with (:func:`positive_int`, :func:`device`, :func:`output_folder`, ...):
a bad value ends the command with exit code 2 and one line (:class:`Parser`), before any work starts."""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
from pathlib import Path

import torch

from diffrt.runtime.solvers import MAX_STEPS, PRESETS

from . import harness, zoo

log = logging.getLogger("diffrt")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE_FORMS = "cpu, cuda or cuda:N"
MESSAGE_CHARS = 300  # an error message longer than this is cut (a 10**6-step grid is not a message)


# ----------------------------------------------------------------------------- argument types

class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block) and exit code 2;
    its sub-command parsers are of the same class."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: object, limit: int = MESSAGE_CHARS) -> str:
    """``message`` on one line, cut to ``limit`` characters (lists in messages can be huge)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{one_line(text, 40)!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise argparse.ArgumentTypeError(f"{value} is out of range: it must be {bounds}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch, steps, repeats, rows, threads...)."""
    return _integer(text, 1)


def steps(text: str) -> int:
    """A number of solver steps: 1..MAX_STEPS (10,000; a plan is a host table per step)."""
    return _integer(text, 1, MAX_STEPS)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seed, warm-up calls...)."""
    return _integer(text, 0)


def even_positive_int(text: str) -> int:
    """A positive even integer (the side of a sample that is halved once)."""
    value = _integer(text, 2)
    if value % 2:
        raise argparse.ArgumentTypeError(f"{value} is odd: it must be a positive even number")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    return _integer(text, 1, 65535)


def _float(text: str, low: float | None = None, strict: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{one_line(text, 40)!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if low is not None and (value <= low if strict else value < low):
        raise argparse.ArgumentTypeError(f"{value:g} is out of range: it must be {'>' if strict else '>='} {low:g}")
    return value


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    return _float(text)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (guidance scale, tolerance, wait times...)."""
    return _float(text, 0.0)


def positive_float(text: str) -> float:
    """A finite number > 0 (time limits)."""
    return _float(text, 0.0, strict=True)


def device(text: str) -> str:
    """cpu, cuda or cuda:N (whether that device is present is checked by :func:`resolve_device`)."""
    name = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise argparse.ArgumentTypeError(f"{one_line(text, 40)!r} is not a device: use {DEVICE_FORMS}")
    return name


def resolve_device(name: str | None) -> torch.device:
    """The device to run on (None: cuda when available, else cpu); ValueError when it is not present."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def output_problem(path: str | Path, folder: bool) -> str | None:
    """What stops writing ``path`` (a folder when ``folder``, else a file), or None. Nothing is created."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        access = os.W_OK | (os.X_OK if folder else 0)
        return None if os.access(path, access) else f"{path} is not writable"
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        return f"{path}: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path}: cannot create it, {ancestor} is not writable"
    return None


def output_folder(text: str) -> str:
    """A folder that exists and is writable, or can be created."""
    problem = output_problem(text, folder=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file(text: str) -> str:
    """A file that can be written (its folder exists and is writable, or can be created)."""
    problem = output_problem(text, folder=False)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


# ----------------------------------------------------------------------------- commands

def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` and ``tune`` sub-commands to the ``diffrt`` parser."""
    p = sub.add_parser("bench", help="latency of a model under the baselines and diffrt's configurations, side by side")
    _workload_arguments(p)
    p.add_argument("--batch", type=positive_int, default=1, help="samples per call (CFG doubles the model batch)")
    p.add_argument("--configs", default="all", help="comma-separated: diffusers-eager, diffusers-compile, "
                   "streamdiffusion, exact, graphs, todo, sparse, int8, adaptive-guidance, early-exit, step-cache, "
                   "combined; or all")
    p.add_argument("--config", default=None, help="an acceleration config (diffrt tune's JSON): adds a 'tuned' row")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="baseline and diffrt dtype (default: fp16 on "
                   "CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per configuration after its "
                   "first (plus one round of all of them right before the timed rounds)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed samples per configuration")
    p.add_argument("--max-seconds", type=positive_float, default=60.0, help="cap on one configuration's timed repeats")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode of the compile "
                   "baseline (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--out", type=output_folder, default="bench-out", help="folder for the JSON and the chart")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--serial", action="store_true", help="time each configuration right after building it and free "
                   "it before the next (less GPU memory; default: all built, timed in interleaved rounds)")
    p.add_argument("--pipeline", action="store_true", help="the model inside its real diffusers pipeline class: "
                   "diffusers eager and torch.compile vs accelerate(pipe), whole pipeline calls "
                   "(sd15-unet, sd-turbo-stream, sdxl-unet, dit-xl-2, flux-like)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("tune", help="the fastest configuration whose samples stay within a quality floor")
    _workload_arguments(p)
    p.add_argument("--quality-floor", type=finite_float, default=30.0, help="mean PSNR (dB) vs the fp32 reference")
    p.add_argument("--batch", type=positive_int, default=4, help="samples per call: the tuning seeds' batch")
    p.add_argument("--axes", default=None, help="comma-separated subset of attention, graphs, steps, int8, todo, "
                   "sparse, adaptive-guidance, early-exit, step-cache (default: all, in that order)")
    p.add_argument("--space", default="default", choices=["default", "quick"], help="quick: fewer values per axis")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed samples per candidate")
    p.add_argument("--out", type=output_file, default="tuned.json", help="the config file (an INT8 calibration is "
                   "saved beside it)")
    p.set_defaults(func=cmd_tune)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark one model: baselines and diffrt configurations; table, JSON and chart."""
    from . import benchmark  # noqa: PLC0415 - the parser stays light for the other commands

    device = _prepare(args)
    workload = zoo.workload(args.model, device, args.resolution, tiny=args.tiny)
    if args.pipeline:
        from . import pipeline_bench  # noqa: PLC0415

        if args.solver is not None:
            raise ValueError("--pipeline runs the pipeline's own scheduler class; --solver does not apply")
        if args.steps is not None:
            workload.steps = args.steps
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        result = pipeline_bench.run(workload, batch=args.batch, configs=configs,
                                    dtype=None if args.dtype is None else DTYPES[args.dtype],
                                    tuned=args.config, warmup=args.warmup, repeats=args.repeats,
                                    max_seconds=args.max_seconds, compile_mode=args.compile_mode, seed=args.seed,
                                    progress=not args.quiet)
        return _report(args, device, result)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result = benchmark.run(workload, batch=args.batch, configs=configs, steps=args.steps, solver=args.solver,
                           dtype=None if args.dtype is None else DTYPES[args.dtype], tuned=args.config,
                           warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds,
                           compile_mode=args.compile_mode,
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
    unstable = [r["config"] for r in result["rows"] if r["status"] == "unstable"]
    if unstable:
        log.warning("unstable timing (p99 far above p50; see the notes): %s", ", ".join(unstable))
    failed = [r["config"] for r in result["rows"] if r["status"] in ("error", "quality-fail")]
    if failed:
        log.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the fastest configuration within --quality-floor; write it as JSON."""
    from . import tune  # noqa: PLC0415

    device = _prepare(args)
    workload = zoo.workload(args.model, device, args.resolution, tiny=args.tiny)
    if args.steps is not None:
        workload.steps = args.steps
    if args.solver is not None:
        workload.solver = args.solver
    axes = tune.AXES if args.axes is None else tuple(a.strip().replace("-", "_") for a in args.axes.split(","))
    out = Path(args.out)
    result = tune.tune(workload, args.quality_floor, batch=args.batch, axes=axes, space=args.space,
                       dtype=None if args.dtype is None else DTYPES[args.dtype], repeats=args.repeats,
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


def _prepare(args: argparse.Namespace) -> torch.device:
    """The device of ``--device`` (checked present) after applying ``--threads``."""
    chosen = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return chosen


def _workload_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --resolution, --steps, --solver, --device, --seed, --threads, --quiet (bench and tune)."""
    p.add_argument("--model", required=True, help=f"{', '.join(zoo.NAMES)}, or a diffusers model folder")
    p.add_argument("--resolution", type=positive_int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=steps, default=None, help=f"solver steps, 1..{MAX_STEPS} (default: the model's, "
                   "e.g. 20)")
    p.add_argument("--solver", default=None, choices=sorted(PRESETS), help="default: the model's (dpmpp-2m mostly)")
    p.add_argument("--device", type=device, default=None, help=f"{DEVICE_FORMS} (default: cuda when available)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the noise and conditions' seed")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tiny", action="store_true", help="the model family at toy sizes (CPU smoke tests; not a speed "
                   "measurement)")
