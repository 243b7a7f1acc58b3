"""``diffrt bench``: a model's sampling latency under the baselines and diffrt's configurations, in one process.

For one :class:`~diffrt.bench.zoo.Workload` at a batch size, every configuration samples the
same noise and conditions (CFG as the workload says). First the **fp32 reference** runs: diffusers'
scheduler loop on the fp32 model, the output every other row is compared with. Then per row:

1. build it (``setup_s``: copies, ``optimize``, INT8 calibration, ``torch.compile`` wrapping);
2. one untimed call (``first_call_s``: compile, graph capture, autotuning happen here), whose
   output is checked against the reference (PSNR; a non-finite output is an error, not timed),
   then the warm-up calls; ``peak_memory_mib`` is what it adds at its peak (CUDA);
3. timed whole samples (CUDA events on GPU), by default in rounds over all configurations (one
   call of each per round, so drift hits every row alike): latency p50 / p90 / p99 ms and
   throughput (samples / s at p50).

Rows: the baselines ``diffusers-eager`` (the model in the benchmark dtype, its own attention:
SDPA; the diffusers scheduler loop as the pipelines run it), ``diffusers-compile`` (the same
with ``torch.compile(model)``) and ``streamdiffusion`` (only where the package is installed);
then diffrt's :data:`CONFIGS`, each an :class:`~diffrt.runtime.acceleration.Acceleration`:
``exact`` (diffrt attention and fused solver step, no approximation), ``graphs``, ``todo``,
``sparse``, ``int8``, ``adaptive-guidance``, ``early-exit``, ``step-cache``, ``combined`` (the
approximations that compose, plus graphs on CUDA) and ``tuned`` (a ``--config`` file).
A configuration that cannot apply to the workload (graphs off CUDA, early exit without exit
heads, ...) is a ``skipped`` row that says why. An exact row whose PSNR falls more than
:data:`EXACT_SLACK_DB` below the eager baseline's (capped at :data:`EXACT_CAP_DB`) is marked ``quality-fail``.

Warm-up covers what is timed: the compile baseline compiles its own model copy, every row runs once more
after all are built, right before the timed rounds; a row whose p99 still exceeds ``harness.SPREAD_LIMIT``
times its p50 is ``unstable`` with a note (:func:`harness.spread_note`): it recompiled while timed.
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import inspect
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffrt.runtime.acceleration import Acceleration
from diffrt.runtime.denoiser import Denoiser

from . import harness
from .zoo import Workload

log = logging.getLogger(__name__)

BASELINES = ("diffusers-eager", "diffusers-compile", "streamdiffusion")
CONFIGS = ("exact", "graphs", "todo", "sparse", "int8", "adaptive-guidance", "early-exit", "step-cache", "combined")
EXACT_SLACK_DB = 3.0
EXACT_CAP_DB = 60.0  # above this an exact row matches the reference as well as it can
TIMED = ("ok", "unstable")  # the statuses of rows that were timed and passed their quality checks
REFERENCE_SEED, CALIBRATION_SEED = 0, 1000
PENDING = "pending"  # Acceleration(int8={"path": PENDING}): calibrate on the workload when the row is built


@dataclass
class Inputs:
    """The noise and conditions every row samples (device tensors; ``uncond`` None without CFG)."""

    noise: torch.Tensor
    cond: Any
    uncond: Any
    guidance_scale: float | None

    @classmethod
    def make(cls, workload: Workload, batch: int, seed: int) -> "Inputs":
        guided = workload.guided
        return cls(workload.noise(batch, seed), workload.make_cond(batch, seed),
                   workload.make_uncond(batch) if guided else None, workload.guidance_scale if guided else None)


# ----------------------------------------------------------------------------- the diffusers loop

def _scheduler_class(solver: str):
    import diffusers  # noqa: PLC0415

    from diffrt.runtime.solvers import PRESETS  # noqa: PLC0415

    if solver not in PRESETS:
        raise ValueError(f"unknown solver {solver!r}; one of {', '.join(sorted(PRESETS))}")
    class_name, overrides = PRESETS[solver]
    return getattr(diffusers, class_name), overrides


def diffusers_scheduler(workload: Workload, solver: str) -> Any:
    """A fresh diffusers scheduler for ``solver`` (diffrt's preset) on the workload's scheduler config."""
    scheduler_cls, overrides = _scheduler_class(solver)
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    config = {k: v for k, v in {**workload.scheduler_config, **overrides}.items() if k in accepted}
    return scheduler_cls(**config)


def scheduler_options(workload: Workload, solver: str) -> dict[str, Any]:
    """The workload's scheduler options beyond the noise schedule (timestep spacing, steps offset...)
    that ``solver``'s scheduler takes: diffrt's Sampler gets them too, so both run the same grid."""
    from diffrt.runtime.solvers import SCHEDULE_KEYS  # noqa: PLC0415

    scheduler_cls, overrides = _scheduler_class(solver)
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    return {k: v for k, v in workload.scheduler_config.items()
            if k in accepted and k not in SCHEDULE_KEYS and k not in overrides and not k.startswith("_")}


def diffusers_sample(den: Denoiser, scheduler: Any, steps: int, inputs: Inputs) -> torch.Tensor:
    """What a diffusers pipeline's denoising loop does: latents in the model dtype, CFG as one
    doubled batch (uncond first), ``scale_model_input`` and ``scheduler.step`` per timestep."""
    scheduler.set_timesteps(steps, device=inputs.noise.device)
    dtype = den.dtype or inputs.noise.dtype
    x = (inputs.noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(dtype)  # flow matching: 1
    guided = inputs.guidance_scale is not None
    cond = torch.cat([inputs.uncond, inputs.cond]) if guided else inputs.cond
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        out = den(x_in, t.to(torch.float32).expand(x_in.shape[0]), cond)
        if guided:
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + inputs.guidance_scale * (cond_out - uncond_out)
        x = scheduler.step(out, t, x).prev_sample.to(dtype)
    return x


def _model_copy(den: Denoiser, dtype: torch.dtype, wrap: Callable[[Any], Any] | None = None) -> Denoiser:
    """``den`` in ``dtype``: the same model when the dtype matches and nothing wraps it, else a copy
    (a compiled model must own its modules: diffrt's rows install layers in the shared one)."""
    own = wrap is not None or dtype != den.dtype
    model = copy.deepcopy(den.model).to(dtype) if own else den.model
    return Denoiser(wrap(model) if wrap else model, den.schedule, sample_shape=den.sample_shape, call=den._call,
                    dtype=dtype)


# ----------------------------------------------------------------------------- configurations

def diffrt_configs(workload: Workload, names: list[str], device: torch.device) -> dict[str, Acceleration | str]:
    """{name: Acceleration, or the reason it does not apply to this workload}."""
    from diffrt.runtime.sampler import DEFAULT_ADAPTIVE_THRESHOLD, DEFAULT_EXIT_THRESHOLD  # noqa: PLC0415

    exact = Acceleration()
    model = workload.den.model
    has_heads = getattr(model, "exit_heads", None) is not None
    blocks = cacheable(model)
    todo = {"factor": {str(workload.todo_level): 2}, "min_tokens": workload.todo_tokens}
    sparse = {"kind": "window", "radius": 2 if workload.sparse_block < 64 else 8, "q_block": workload.sparse_block,
              "k_block": workload.sparse_block, "min_tokens": workload.sparse_tokens}
    int8 = {"path": PENDING, "groups": "auto"}
    options: dict[str, Acceleration | str] = {
        "exact": exact,
        "graphs": exact.replace(cuda_graphs=True) if device.type == "cuda" else "CUDA graphs need a CUDA device",
        "todo": exact.replace(todo=todo),
        "sparse": exact.replace(sparse=sparse),
        "int8": exact.replace(int8=int8),
        "adaptive-guidance": (exact.replace(adaptive_guidance=DEFAULT_ADAPTIVE_THRESHOLD) if workload.guided
                              else "the workload samples without CFG"),
        "early-exit": (exact.replace(early_exit=DEFAULT_EXIT_THRESHOLD) if has_heads
                       else "the model has no exit heads"),
        "step-cache": (exact.replace(step_cache=0.1) if blocks
                       else f"no block list for the step cache in {type(model).__name__} (DiT-style transformers only)"),
    }
    combined = exact.replace(todo=todo, int8=int8, cuda_graphs=device.type == "cuda",
                             adaptive_guidance=DEFAULT_ADAPTIVE_THRESHOLD if workload.guided else None)
    if has_heads:
        combined = combined.replace(early_exit=DEFAULT_EXIT_THRESHOLD)
    elif blocks and device.type != "cuda":
        combined = combined.replace(step_cache=0.1)
    options["combined"] = combined
    return {n: options[n] for n in names}


def cacheable(model: Any) -> bool:
    """Whether the step cache can wrap ``model`` (one sequential transformer block list)."""
    from diffrt.runtime.step_cache import block_list  # noqa: PLC0415

    try:
        block_list(model)
    except (ValueError, TypeError):
        return False
    return True


class Calibrations:
    """INT8 calibrations made on demand (per solver, steps and groups), saved under ``folder``: an
    ``int8={"path": PENDING, "groups": ...}`` request becomes the path of one calibrated on the
    workload (other seeds than the benchmark's) at the configuration's solver and steps."""

    def __init__(self, workload: Workload, batch: int, folder: str | Path | None = None, progress: bool = True):
        self.workload, self.batch, self.progress = workload, batch, progress
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="diffrt-calibration-"))
        self._made: dict[tuple, Path] = {}

    def resolve(self, acc: Acceleration, solver: str, steps: int) -> Acceleration:
        """``acc`` with a pending int8 request replaced by a saved calibration's path."""
        if not isinstance(acc.int8, dict) or acc.int8.get("path") != PENDING:
            return acc
        from diffrt.export import calibrate  # noqa: PLC0415

        solver = solver if acc.solver is None else acc.solver
        steps = steps if acc.steps is None else acc.steps
        groups = acc.int8.get("groups", "auto")
        key = (solver, steps, groups)
        if key not in self._made:
            w = self.workload
            inputs = Inputs.make(w, max(2, self.batch), CALIBRATION_SEED)
            uncond = inputs.uncond if w.guided else None
            calibration = calibrate(w.den, solver, steps, cond=inputs.cond, uncond=uncond,
                                    guidance_scale=inputs.guidance_scale, seeds=(CALIBRATION_SEED,), groups=groups,
                                    progress=self.progress, **scheduler_options(w, solver))
            path = self.folder / f"{w.name.replace('/', '_')}-{solver}-{steps}-{groups}"
            calibration.save(path)
            self._made[key] = path
        return acc.replace(int8={"path": str(self._made[key]), "groups": groups})


# ----------------------------------------------------------------------------- rows

def _baseline_builders(workload: Workload, dtype: torch.dtype, solver: str, steps: int, compile_mode: str | None,
                       inputs: Inputs) -> dict[str, Callable[[], Callable[[], torch.Tensor]] | str]:
    def eager():
        den = _model_copy(workload.den, dtype)
        return lambda: diffusers_sample(den, diffusers_scheduler(workload, solver), steps, inputs)

    def compiled():
        den = _model_copy(workload.den, dtype, lambda m: torch.compile(m, mode=compile_mode))
        return lambda: diffusers_sample(den, diffusers_scheduler(workload, solver), steps, inputs)

    stream = ("not installed (pip install streamdiffusion to add its row)"
              if importlib.util.find_spec("streamdiffusion") is None else
              "installed, but its wrapper takes a whole StableDiffusionPipeline (tokenizer, text encoder, VAE) "
              "that these random-weight workloads do not build; run StreamDiffusion's own benchmark beside it")
    return {"diffusers-eager": eager, "diffusers-compile": compiled, "streamdiffusion": stream}


def _diffrt_builder(workload: Workload, config: Acceleration | Path, solver: str, steps: int, inputs: Inputs,
                    calibrations: Calibrations):
    """``config``: an Acceleration, or a saved one's path (its calibration path is relative to it)."""
    def build():
        from diffrt.runtime.optimized import optimize  # noqa: PLC0415

        acc = Acceleration.load(config) if isinstance(config, Path) else calibrations.resolve(config, solver, steps)
        fast = optimize(workload.den, config=config if isinstance(config, Path) else acc)
        sampler = acc.sampler(fast, solver, steps, guidance_scale=inputs.guidance_scale,
                              **scheduler_options(workload, acc.solver or solver))
        return lambda: sampler.sample(inputs.noise, cond=inputs.cond, uncond=inputs.uncond, check=False)
    return build


def psnr_db(candidate: torch.Tensor, reference: torch.Tensor, data_range: float | None) -> tuple[float, float]:
    """(mean, min) PSNR over the samples, in dB, over ``data_range`` (None: the reference's peak-to-peak)."""
    ref = reference.double()
    span = data_range if data_range is not None else (ref.max() - ref.min()).item()
    mse = ((candidate.double() - ref) ** 2).flatten(1).mean(1).clamp_min(1e-30)
    values = 10 * torch.log10(span ** 2 / mse)
    return values.mean().item(), values.min().item()


def prepare_row(name: str, kind: str, build: Callable[[], Callable[[], torch.Tensor]], reference: torch.Tensor | None,
                workload: Workload, device: torch.device, warmup: int) -> tuple[dict[str, Any], Callable | None]:
    """Build one configuration, check its first output against the reference, warm it up.

    Returns (row, the sampling function; None when it failed). ``peak_memory_mib`` (CUDA) is what the
    configuration adds at its peak over the memory allocated before it was built (its model copy,
    buffers, graph pools, activations)."""
    row: dict[str, Any] = {"config": name, "kind": kind, "status": "ok"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        fn = build()
        row["setup_s"] = time.perf_counter() - start
        with torch.no_grad():
            start = time.perf_counter()
            out = fn()
            harness.sync(device)
            row["first_call_s"] = time.perf_counter() - start
            if not torch.isfinite(out).all():
                return {**row, "status": "error", "note": "non-finite output: not timed"}, None
            if reference is not None:
                row["psnr_db"], row["psnr_min_db"] = psnr_db(out.float(), reference, workload.data_range)
            for _ in range(warmup):
                fn()
            harness.sync(device)
    except Exception as error:  # noqa: BLE001 - one failing configuration is a row, not the end of the run
        log.exception("%s failed", name)
        return {**row, "status": "error", "note": f"{type(error).__name__}: {error}"}, None
    if device.type == "cuda":
        row["peak_memory_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        row["peak_memory_mib"] = None
    return row, fn


def time_rows(entries: list[tuple[dict[str, Any], Callable]], device: torch.device, batch: int, repeats: int,
              max_seconds: float | None, warmup: int = 1) -> None:
    """Time whole samples in rounds, one call of every configuration per round, so that a machine's
    drift (clocks, other load) spreads over all rows alike; stops after ``max_seconds`` per row
    (at least 3 rounds). First ``warmup`` untimed rounds, so that what building the other rows changed
    recompiles there. Fills latency, repeats and throughput in; marks a still cold row (:func:`flag_spread`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seconds: list[list[float]] = [[] for _ in entries]
    with torch.no_grad():
        for _ in range(warmup):
            for _, fn in entries:
                fn()
        harness.sync(device)
        began = time.perf_counter()
        for round_index in range(repeats):
            for index, (_, fn) in enumerate(entries):
                seconds[index].append(harness.measure(fn, device, warmup=0, repeats=1).seconds[0])
            spent = time.perf_counter() - began
            if max_seconds is not None and round_index >= 2 and spent > max_seconds * len(entries):
                break
    for (row, _), values in zip(entries, seconds):
        stats = harness.Timing(values).stats(scale=1e3)
        row.update({"latency_ms": {k: stats[k] for k in ("median", "p90", "p99", "p20", "p80", "min", "mean")},
                    "repeats": stats["count"], "throughput_per_s": batch / (stats["median"] / 1e3)})
        flag_spread(row)


def flag_spread(row: dict[str, Any], limit: float = harness.SPREAD_LIMIT) -> None:
    """Mark a timed ``ok`` row ``unstable`` (with :func:`harness.spread_note`'s note) when its spread says so."""
    note = harness.spread_note(row["latency_ms"], limit)
    if note is None or row["status"] != "ok":
        return
    row["status"] = "unstable"
    _add_note(row, note)
    log.warning("%s: %s", row["config"], note)


def _add_note(row: dict[str, Any], note: str) -> None:
    row["note"] = f"{row['note']}; {note}" if row.get("note") else note


def _check_run(batch: int, steps: int | None, warmup: int, repeats: int, max_seconds: float | None) -> None:
    """ValueError for a setting :func:`run` cannot honour (before anything is built)."""
    bad = [f"{name}={value}" for name, value, low in (("batch", batch, 1), ("steps", steps, 1), ("warmup", warmup, 0),
           ("repeats", repeats, 1), ("max_seconds", max_seconds, 1e-9)) if value is not None and value < low]
    if bad:
        raise ValueError(f"{', '.join(bad)}: batch, steps, repeats must be >= 1, warmup >= 0, max_seconds > 0")


def run(workload: Workload, batch: int = 1, configs: list[str] | None = None, steps: int | None = None,
        solver: str | None = None, dtype: torch.dtype | None = None, tuned: str | Path | None = None,
        warmup: int = 2, repeats: int = 10, max_seconds: float | None = 60.0, compile_mode: str | None = None,
        seed: int = REFERENCE_SEED, progress: bool = True, interleave: bool = True) -> dict[str, Any]:
    """Every requested row for ``workload`` (module docstring); returns {"rows", "workload", "settings"}.

    ``interleave``: all configurations stay built and are timed in rounds (:func:`time_rows`);
    False times each right after building it and frees it before the next (less memory)."""
    _check_run(batch, steps, warmup, repeats, max_seconds)
    device = workload.den.device or torch.device("cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    solver = workload.solver if solver is None else solver
    steps = workload.steps if steps is None else steps
    names = list(BASELINES + CONFIGS) if not configs or configs == ["all"] else list(dict.fromkeys(configs))
    unknown = [n for n in names if n not in BASELINES + CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(BASELINES + CONFIGS)} "
                         "or 'all'")
    compile_mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    inputs = Inputs.make(workload, batch, seed)
    with torch.no_grad():
        reference = diffusers_sample(workload.den, diffusers_scheduler(workload, solver), steps, inputs).float()
    baselines = _baseline_builders(workload, dtype, solver, steps, compile_mode, inputs)
    dtype_name = str(dtype).replace("torch.", "")
    accelerations = diffrt_configs(workload, [n for n in names if n in CONFIGS], device)
    scratch = tempfile.TemporaryDirectory(prefix="diffrt-bench-calibration-")
    calibrations = Calibrations(workload, batch, scratch.name, progress=progress)
    jobs = []
    for name in (n for n in names if n in baselines):  # a baseline is a builder, or why it cannot run here
        build = baselines[name]
        jobs.append(_Job(name, "baseline", skip=build) if isinstance(build, str) else _Job(name, "baseline", build))
    for name, acc in accelerations.items():
        if isinstance(acc, str):
            jobs.append(_Job(name, "diffrt", skip=acc))
        else:
            acc = acc.replace(dtype=dtype_name)
            jobs.append(_Job(name, "diffrt", _diffrt_builder(workload, acc, solver, steps, inputs, calibrations),
                             acc=acc))
    if tuned is not None:
        jobs.append(_Job("tuned", "diffrt", _diffrt_builder(workload, Path(tuned), solver, steps, inputs, calibrations),
                         acc=Acceleration.load(tuned)))
    rows, timed = [], []
    try:
        for job in tqdm(jobs, desc=f"bench {workload.name}", unit="config", disable=not progress):
            if job.skip is not None:
                rows.append({"config": job.name, "kind": job.kind, "status": "skipped", "note": job.skip})
                continue
            log.info("bench %s: %s", workload.name, job.name)
            row, fn = prepare_row(job.name, job.kind, job.build, reference, workload, device, warmup)
            if job.acc is not None:
                row.update({"exact": job.acc.exact, "acceleration": job.acc.describe(),
                            "acceleration_config": job.acc.to_dict()})
            rows.append(row)
            if fn is not None and interleave:
                timed.append((row, fn))
            elif fn is not None:
                time_rows([(row, fn)], device, batch, repeats, max_seconds, warmup=0)  # warmed just now
            del fn
            gc.collect()
        if timed:
            log.info("bench %s: timing %d configurations in %d rounds", workload.name, len(timed), repeats)
            time_rows(timed, device, batch, repeats, max_seconds, warmup=min(warmup, 1))
    finally:
        timed.clear()
        scratch.cleanup()
    _speedups(rows)
    settings = {"batch": batch, "solver": solver, "steps": steps, "dtype": dtype_name, "device": str(device),
                "guidance_scale": inputs.guidance_scale, "seed": seed, "warmup": warmup, "repeats": repeats,
                "compile_mode": compile_mode, "interleaved": interleave,
                "reference": "diffusers loop, fp32 model, same noise"}
    return {"rows": rows, "workload": workload.summary(), "settings": settings}


@dataclass
class _Job:
    """One row to produce: how to build it, or why it is skipped; ``acc`` for diffrt rows."""

    name: str
    kind: str
    build: Callable[[], Callable[[], torch.Tensor]] | None = None
    skip: str | None = None
    acc: Acceleration | None = None


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Speedup over every timed baseline; quality-fail for exact rows well below the eager baseline's PSNR."""
    timed = {r["config"]: r["latency_ms"]["median"] for r in rows if r["status"] in TIMED and r["kind"] == "baseline"}
    eager_psnr = next((r.get("psnr_db") for r in rows if r["config"] == "diffusers-eager" and r["status"] in TIMED),
                      None)
    exact_psnr = next((r.get("psnr_db") for r in rows if r["config"] == "exact" and r["status"] in TIMED), None)
    floor = None if eager_psnr is None else min(eager_psnr, EXACT_CAP_DB) - EXACT_SLACK_DB
    for row in rows:
        if row["status"] not in TIMED:
            continue
        row["speedup"] = {name: ms / row["latency_ms"]["median"] for name, ms in timed.items()}
        if row.get("exact") is False and exact_psnr is not None and row.get("psnr_db") == exact_psnr:
            _add_note(row, "the same samples as 'exact': the option did not apply at this shape (e.g. fewer tokens "
                      "than its min_tokens)")
        if row.get("exact") and floor is not None and row.get("psnr_db", math.inf) < floor:
            row["status"] = "quality-fail"
            _add_note(row, f"exact configuration at {row['psnr_db']:.1f} dB, the eager baseline at {eager_psnr:.1f} dB")
