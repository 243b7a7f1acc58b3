"""The ``diffrt`` command line.

``diffrt sample``: sample with a diffrt solver and with the matching diffusers scheduler loop
on the same noise and model, and print per-step time and the parity between the two.
``diffrt demo``: the shipped digits DiT, reference vs fast configuration (grids + table).
``diffrt export onnx|tensorrt``: a model as ONNX (QDQ with ``--int8``) or TensorRT engines.
``diffrt bench``: a model's latency under the baselines and diffrt's configurations (table, JSON, chart).
``diffrt tune``: the fastest configuration within a quality floor, written for ``optimize(config=...)``.
(bench and tune are defined by :mod:`diffrt.bench.cli`: the tools live in diffrt.bench, apart from the runtime.)
``diffrt serve``: an HTTP / WebSocket server with dynamic batching (FastAPI + uvicorn; diffrt.serve).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("diffrt")


def _tiny_unet(channels: int, size: int, seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10).eval()


def _diffusers_scheduler(solver: str, schedule_config: dict, options: dict):
    import diffusers

    from .solvers import PRESETS, STEP_OPTIONS, class_config

    class_name, preset = PRESETS[solver]
    step_keys = STEP_OPTIONS.get(class_name, ())
    config = class_config(class_name, {**schedule_config, **preset, **{k: v for k, v in options.items() if k not in step_keys}})
    config.pop("_class_name", None)
    return getattr(diffusers, class_name)(**config), {k: v for k, v in options.items() if k in step_keys}


def _diffusers_loop(scheduler, unet, noise, cond, steps, step_kwargs, generator):
    """The canonical diffusers loop; returns (final sample, per-step seconds, per-step samples)."""
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = {"generator": generator, **step_kwargs}
    times, samples = [], []
    for t in scheduler.timesteps:
        start = time.perf_counter()
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        m = unet(x_in, t, class_labels=cond).sample
        x = scheduler.step(m, t, x, **step_kwargs).prev_sample
        _sync(x.device)
        times.append(time.perf_counter() - start)
        samples.append(x.clone())
    return x, times, samples


def cmd_sample(args: argparse.Namespace) -> int:
    """Run diffrt's sampler and diffusers' loop side by side; print per-step time and parity."""
    from diffrt.bench.cli import resolve_device  # noqa: PLC0415
    from diffrt.runtime import Denoiser, Sampler

    from .quality_stats import relative_error
    from .solvers import PRESETS

    device = resolve_device(args.device)
    unet = _tiny_unet(args.channels, args.resolution, args.seed).to(device)
    if "FlowMatch" in PRESETS[args.solver][0]:
        schedule_config = {"num_train_timesteps": 1000, "shift": 3.0}
    else:
        schedule_config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                           "beta_end": 0.012, "prediction_type": "epsilon"}
    options = {"eta": args.eta} if args.eta is not None else {}
    scheduler, step_kwargs = _diffusers_scheduler(args.solver, schedule_config, options)
    den = Denoiser.from_diffusers(unet, scheduler.config)
    sampler = Sampler(den, solver=args.solver, steps=args.steps, backend=args.backend, **options)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, args.channels, args.resolution, args.resolution, generator=gen).to(device)
    cond = (torch.arange(args.batch) % 10).to(device)

    ours, marks = [], []
    with torch.no_grad():
        sampler.sample(noise, cond=cond, generator=torch.Generator().manual_seed(args.seed + 1))  # warm-up
        _sync(device)
        marks.append(time.perf_counter())

        def record(i, x):
            _sync(device)
            marks.append(time.perf_counter())
            ours.append(x.clone())

        sampler.sample(noise, cond=cond, generator=torch.Generator().manual_seed(args.seed + 1), callback=record)
        _, ref_times, ref = _diffusers_loop(scheduler, unet, noise, cond, args.steps, step_kwargs,
                                            torch.Generator().manual_seed(args.seed + 1))
    our_times = [b - a for a, b in zip(marks, marks[1:])]
    timesteps = sampler.plan.timesteps().tolist()
    print(f"diffrt sample: solver={args.solver} steps={args.steps} model=tiny-unet "
          f"{args.batch}x{args.channels}x{args.resolution}x{args.resolution} device={device} backend={args.backend}")
    print(f"{'step':>4} {'timestep':>9} {'diffrt ms':>10} {'diffusers ms':>13} {'rel. error':>11}")
    errors = []
    for i, (a, b) in enumerate(zip(ours, ref)):
        errors.append(relative_error(a, b))
        print(f"{i:>4} {timesteps[i]:>9.2f} {our_times[i] * 1e3:>10.2f} {ref_times[i] * 1e3:>13.2f} {errors[-1]:>11.2e}")
    worst = max(errors)
    ok = len(ours) == len(ref) and worst <= args.tolerance
    print(f"total: diffrt {sum(our_times) * 1e3:.1f} ms, diffusers {sum(ref_times) * 1e3:.1f} ms; "
          f"worst relative error {worst:.2e} ({'PASS' if ok else 'FAIL'} at {args.tolerance:g})")
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Sample digits with the reference and the fast configuration; write grids; print the table."""
    from diffrt.bench.cli import resolve_device  # noqa: PLC0415

    from .demo import format_table, run_demo

    start = time.perf_counter()
    device = resolve_device(args.device)
    results = run_demo(args.out, rows=args.rows, guidance_scale=args.guidance_scale, seed=args.seed, device=device,
                       reference_steps=args.reference_steps, fast_steps=args.fast_steps)
    print(format_table(results))
    for row in results:
        print(f"grid: {row['grid']}")
    print(f"demo took {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX, or build its TensorRT engines; print what was written."""
    from diffrt.export import Calibration, export_groups, export_onnx  # noqa: PLC0415

    from . import models  # noqa: PLC0415

    out = _export_out(args)
    den = models.load_model(args.model, args.scheduler_config)
    calibration = None if args.int8 is None else Calibration.load(args.int8)
    resolution = args.resolution
    start = time.perf_counter()
    if args.target == "onnx":
        if calibration is not None and args.per_group:
            results = export_groups(den, out, calibration, batch=args.batch, resolution=resolution)
        else:
            results = [export_onnx(den, out, batch=args.batch, resolution=resolution, calibration=calibration,
                                   simplify=args.simplify)]
        for result in results:
            size = result.path.stat().st_size + (result.data_path.stat().st_size if result.data_path else 0)
            print(f"wrote {result.path} ({size / 1e6:.1f} MB{', data ' + result.data_path.name if result.data_path else ''})"
                  f": inputs {result.manifest['inputs']}, int8 {result.manifest['int8_scales'] or 'no'}, "
                  f"opset {result.manifest['opset']}, {result.seconds:.1f} s")
        return 0
    from diffrt.export.artifacts import ArtifactCache  # noqa: PLC0415
    from diffrt.export.tensorrt_backend import trt_denoiser  # noqa: PLC0415

    precision = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    batch_range = (1, 2, 8) if args.batch is None else (args.batch,) * 3
    resolution_range = None if resolution is None else (resolution,) * 3
    trt = trt_denoiser(den, calibration, precision=precision, cache=ArtifactCache(out),
                       batch_range=batch_range, resolution_range=resolution_range)
    print(f"TensorRT: {len(trt.engines)} engine(s) ({args.precision}{', int8 QDQ' if calibration else ''}) in "
          f"{'the default cache' if out is None else out}, batch {batch_range}, {time.perf_counter() - start:.1f} s")
    return 0


def _export_out(args: argparse.Namespace) -> Path | None:
    """Where ``diffrt export`` writes: the .onnx file, the per-group folder (``--int8 --per-group``) or the
    TensorRT cache folder (None: the default cache); ValueError when it cannot be written."""
    from diffrt.bench.cli import output_problem  # noqa: PLC0415

    if args.target == "tensorrt":
        out, folder = (None if args.out is None else Path(args.out)), True
    else:
        out = Path(args.out if args.out is not None else f"{Path(args.model).name}.onnx")
        folder = args.int8 is not None and args.per_group
        out = out.with_suffix("") if folder else out
    problem = None if out is None else output_problem(out, folder=folder)
    if problem is not None:
        raise ValueError(f"--out: {problem}")
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the FastAPI server under uvicorn until interrupted."""
    try:
        import uvicorn  # noqa: PLC0415

        from diffrt.serve import ServeConfig, create_app  # noqa: PLC0415
        from diffrt.serve.engine import DEFAULT_ACCELERATIONS  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"diffrt serve needs the serve extra: pip install 'diffrt[serve]' ({error})") from error
    from diffrt.bench.cli import resolve_device  # noqa: PLC0415

    resolve_device(args.device)  # present, before loading anything
    accelerations = {**DEFAULT_ACCELERATIONS, **dict(args.acceleration or [])}
    config = ServeConfig(models=args.models, accelerations=accelerations, device=args.device,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_streams=args.max_streams, max_body_bytes=args.max_body_bytes,
                         stream_idle_timeout_s=args.stream_idle_timeout_s)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``diffrt`` parser: every option has a type that refuses a bad value with one line and exit code 2."""
    from diffrt.bench import cli as bench_cli  # noqa: PLC0415

    parser = bench_cli.Parser(prog="diffrt", description="diffrt: an inference runtime for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (an error's traceback too)")
    sub = parser.add_subparsers(dest="command", required=True)
    _sample_arguments(sub.add_parser("sample", help="sample with diffrt and diffusers side by side; per-step time "
                                     "and parity"), bench_cli)
    _demo_arguments(sub.add_parser("demo", help="sample the shipped digits DiT: reference vs fast configuration, "
                                   "grids + table"), bench_cli)
    _export_arguments(sub.add_parser("export", help="export a model to ONNX or build TensorRT engines, INT8 from a "
                                     "calibration"), bench_cli)
    bench_cli.add_commands(sub)  # diffrt bench, diffrt tune: the tools of diffrt.bench
    _serve_arguments(sub.add_parser("serve", help="an HTTP / WebSocket server with dynamic batching (POST "
                                    "/v1/generate, WS /v1/stream, /healthz, /metrics)"), bench_cli)
    return parser


def _sample_arguments(p: argparse.ArgumentParser, checks: ModuleType) -> None:
    from .sampler import STEP_BACKENDS  # noqa: PLC0415
    from .solvers import PRESETS  # noqa: PLC0415

    p.add_argument("--solver", default="dpmpp-2m", choices=sorted(PRESETS))
    p.add_argument("--steps", type=checks.steps, default=20)
    p.add_argument("--batch", type=checks.positive_int, default=2)
    p.add_argument("--channels", type=checks.positive_int, default=4)
    p.add_argument("--resolution", type=checks.even_positive_int, default=32, help="image side (even: the toy UNet "
                   "halves it once)")
    p.add_argument("--eta", type=checks.non_negative_float, default=None, help="DDIM eta")
    p.add_argument("--backend", default="auto", choices=STEP_BACKENDS, help="solver-step backend")
    p.add_argument("--device", type=checks.device, default=None, help=f"{checks.DEVICE_FORMS} (default: cuda when "
                   "available)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0)
    p.add_argument("--tolerance", type=checks.non_negative_float, default=1e-5, help="largest relative error "
                   "accepted at any step")
    p.set_defaults(func=cmd_sample)


def _demo_arguments(p: argparse.ArgumentParser, checks: ModuleType) -> None:
    p.add_argument("--out", type=checks.output_folder, default="demo-out", help="folder for the PNG grids")
    p.add_argument("--rows", type=checks.positive_int, default=1, help="rows of digits 0-9 per configuration")
    p.add_argument("--guidance-scale", type=checks.non_negative_float, default=3.0)
    p.add_argument("--reference-steps", type=checks.steps, default=50, help="steps of the reference "
                   "configuration")
    p.add_argument("--fast-steps", type=checks.steps, default=20, help="steps of the fast configuration")
    p.add_argument("--device", type=checks.device, default=None, help=f"{checks.DEVICE_FORMS} (default: cuda when "
                   "available)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0)
    p.set_defaults(func=cmd_demo)


def _export_arguments(p: argparse.ArgumentParser, checks: ModuleType) -> None:
    p.add_argument("target", choices=["onnx", "tensorrt"])
    p.add_argument("--model", required=True, help="a reference model name or a diffusers model folder")
    p.add_argument("--scheduler-config", type=checks.existing_file, default=None, help="scheduler_config.json of a "
                   "diffusers model folder")
    p.add_argument("--int8", default=None, help="a calibration saved by Calibration.save (path without suffix)")
    p.add_argument("--batch", type=checks.positive_int, default=None, help="a static batch size (default: dynamic)")
    p.add_argument("--resolution", type=height_width, default=None, help="a static HxW, e.g. 64x64 (default: the "
                   "model's own)")
    p.add_argument("--out", default=None, help="ONNX: the .onnx path; TensorRT: the engine cache folder")
    p.add_argument("--per-group", action="store_true", help="ONNX with --int8: one graph per timestep group "
                   "(constant scales, as TensorRT needs)")
    p.add_argument("--simplify", action="store_true", help="apply ONNX Runtime's basic graph optimizations")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="TensorRT precision")
    p.set_defaults(func=cmd_export)


def _serve_arguments(p: argparse.ArgumentParser, checks: ModuleType) -> None:
    p.add_argument("--models", type=name_list, default=("digits-dit", "digits-unet"), help="comma-separated models "
                   "to serve (zoo names; NAME:tiny for toy sizes)")
    p.add_argument("--acceleration", type=name_and_path, action="append", help="NAME=PATH: offer a diffrt tune "
                   "config under NAME (repeatable; 'exact' and 'fast' are built in)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=checks.port, default=8000, help="1..65535")
    p.add_argument("--device", type=checks.device, default=None, help=f"{checks.DEVICE_FORMS} (default: cuda when "
                   "available)")
    p.add_argument("--max-batch", type=checks.positive_int, default=8, help="requests per model batch at most")
    p.add_argument("--max-wait-ms", type=checks.non_negative_float, default=10.0, help="how long a request waits for "
                   "others to batch with")
    p.add_argument("--max-queue", type=checks.positive_int, default=64, help="requests waiting at most; more get 503 "
                   "+ Retry-After")
    p.add_argument("--max-streams", type=checks.non_negative_int, default=4, help="concurrent /v1/stream connections")
    p.add_argument("--max-body-bytes", type=checks.positive_int, default=8 << 20, help="largest request body or "
                   "WebSocket message in bytes (more: 413 / close 1009; default 8 MiB)")
    p.add_argument("--stream-idle-timeout-s", type=checks.positive_float, default=30.0, help="close a /v1/stream "
                   "connection that sends nothing this long (seconds, default 30)")
    p.add_argument("--threads", type=checks.positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_serve)


def height_width(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 64x64) as two positive integers (argparse type)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not HxW with positive integers, e.g. 64x64")
    return int(parts[0]), int(parts[1])


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names, at least one (argparse type)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("no name given (comma-separated names)")
    return names


def name_and_path(text: str) -> tuple[str, str]:
    """``NAME=PATH`` (argparse type)."""
    name, sep, path = (part.strip() for part in text.partition("="))
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not NAME=PATH (a diffrt tune file)")
    return name, path


EXPECTED_ERRORS = (ValueError, TypeError, NotImplementedError, ImportError, FileNotFoundError, PermissionError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one ``diffrt`` command. A bad option ends in argparse (exit 2, one line); an expected error
    raised by the work (bad model, missing file, unwritable folder...) is one log line and exit code 2."""
    from diffrt.bench.cli import one_line  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        log.error("%s", one_line(str(exc) or type(exc).__name__))
        log.debug("the traceback", exc_info=True)
        return 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
