"""The serving engine: the models a server loaded, requests checked against them, batches sampled.

:class:`Engine` is shared by the FastAPI server (with its own :class:`~diffrt.serve.batcher.Batcher`)
and the Ray Serve deployment (with ``@serve.batch``). Models are :mod:`diffrt.bench.zoo`
workloads (the shipped ``digits-dit`` / ``digits-unet``, or any zoo name; ``name:tiny`` for the toy
sizes), loaded on first use; each request names a model, an acceleration the server offers
(:class:`~diffrt.runtime.acceleration.Acceleration`, from a preset or a ``diffrt tune`` file), a
solver, steps and guidance. Requests with the same :meth:`Engine.key` share one model batch. The
plan (solver, steps) is one per batch: its coefficient table is shared by the rows, so different
step counts or solvers form separate batches. Guidance scales may differ within a batch: the
rows' classifier-free guidance is combined per row (``u + g_row (c - u)``, as diffusers' pipelines
do) before the unguided plan's step (:class:`RowGuidance`), except under an acceleration whose
adaptive guidance or early exit decides per step inside the sampler: there the scale is part of
the key. One lock serialises the device between batches and stream ticks.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrt.bench import zoo
from diffrt.runtime.acceleration import Acceleration
from diffrt.runtime.denoiser import Denoiser

from .checks import check_model_names, plan_problem
from .schema import GenerateRequest, StreamConfig

log = logging.getLogger(__name__)

DEFAULT_ACCELERATIONS = {"exact": Acceleration(), "fast": Acceleration(adaptive_guidance=0.95)}


class RequestError(Exception):
    """A request the server cannot serve as asked: ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unavailable(Exception):
    """The server could not run the request now (queue full, out of memory): HTTP 503, retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StreamModelError(Exception):
    """A stream tick failed because the model fails on its own (not because of the frame): the stream ends."""


@dataclass
class ServeConfig:
    """What a server loads and how it batches (the CLI's ``diffrt serve`` options)."""

    models: tuple[str, ...] = ("digits-dit", "digits-unet")
    accelerations: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACCELERATIONS))
    device: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_streams: int = 4
    max_body_bytes: int = 8 << 20
    retry_after_s: float = 1.0
    stream_idle_timeout_s: float = 30.0  # a stream that sends no config / no next frame this long is closed

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_streams < 0 or self.max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_streams and max_wait_ms >= 0")
        if self.max_body_bytes < 1 or not self.stream_idle_timeout_s > 0:
            raise ValueError("max_body_bytes must be >= 1 and stream_idle_timeout_s > 0")
        self.accelerations = {name: _acceleration(value) for name, value in self.accelerations.items()}


def _acceleration(value: Any) -> Acceleration:
    if isinstance(value, Acceleration):
        return value
    if isinstance(value, dict):
        return Acceleration.from_dict(value)
    return Acceleration.load(Path(value))


@dataclass
class Result:
    """One request's sample [C, H, W] (float32, CPU) and how it was computed."""

    sample: torch.Tensor
    batch_size: int
    latency_ms: float

    def png(self) -> bytes:
        return encode_png(self.sample)

    def npy_base64(self) -> str:
        return base64.b64encode(encode_npy(self.sample)).decode()


def encode_png(sample: torch.Tensor) -> bytes:
    """A [1 or 3, H, W] sample in [-1, 1] as an 8-bit PNG."""
    from PIL import Image  # noqa: PLC0415 - Pillow is a dependency of the serve extra

    pixels = ((sample.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L" if pixels.shape[0] == 1 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise RequestError(400, f"a frame must be a .npy float array: {error}") from error
    if array.dtype.kind != "f":
        raise RequestError(400, f"a frame must hold floats, got {array.dtype}")
    return torch.from_numpy(array.astype(np.float32))


class RowGuidance(Denoiser):
    """Classifier-free guidance with one scale per row: ``u + scales[row] * (c - u)`` from one doubled model
    call (unconditional rows first), so the Sampler runs the unguided plan on the combined prediction."""

    def __init__(self, base: Denoiser, uncond: torch.Tensor, scales: torch.Tensor):
        super().__init__(base.model, base.schedule, sample_shape=base.sample_shape, call=base._call, dtype=base.dtype)
        self.base, self.uncond, self.scales = base, uncond, scales

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        both = torch.cat([self.uncond, cond]) if torch.is_tensor(cond) else None
        out_u, out_c = self.base(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        scale = self.scales.to(out_c.dtype).reshape(-1, *[1] * (out_c.dim() - 1))
        return out_u + scale * (out_c - out_u)

    def check_plan(self, plan) -> None:
        check = getattr(self.base, "check_plan", None)
        if check is not None:
            check(plan)

    def reset_cache(self) -> None:
        reset = getattr(self.base, "reset_cache", None)
        if reset is not None:
            reset()


class Engine:
    """Models, samplers and the device lock of one server process (module docstring)."""

    def __init__(self, config: ServeConfig):
        check_model_names(tuple(config.models))
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.lock = threading.Lock()
        self._workloads: dict[str, zoo.Workload] = {}
        self._optimized: dict[tuple[str, str], Any] = {}
        self._samplers: OrderedDict[tuple, Any] = OrderedDict()
        self._load_lock = threading.Lock()
        self._plan_problems: dict[tuple[str, str, int], str | None] = {}  # bounded: models x solvers x steps
        self._plan_lock = threading.Lock()  # one check at a time: diffusers' lazy imports are not thread-safe

    # ------------------------------------------------------------------ requests

    def workload(self, name: str) -> zoo.Workload:
        if name not in self.config.models:
            raise RequestError(404, f"unknown model {name!r}; this server has {', '.join(self.config.models)}")
        with self._load_lock:
            if name not in self._workloads:
                base, _, variant = name.partition(":")
                log.info("serve: loading %s on %s", name, self.device)
                self._workloads[name] = zoo.workload(base, self.device, tiny=variant == "tiny")
        return self._workloads[name]

    def check(self, request: GenerateRequest) -> zoo.Workload:
        """Raise :class:`RequestError` for what this server cannot serve as asked; the workload otherwise."""
        from diffrt.runtime.solvers import PRESETS  # noqa: PLC0415

        workload = self.workload(request.model)
        if request.acceleration not in self.config.accelerations:
            raise RequestError(400, f"unknown acceleration {request.acceleration!r}; this server offers "
                                    f"{', '.join(self.config.accelerations)}")
        if request.solver not in PRESETS:
            raise RequestError(400, f"unknown solver {request.solver!r}; one of {', '.join(sorted(PRESETS))}")
        acc = self.config.accelerations[request.acceleration]
        for option in ("solver", "steps"):
            pinned = getattr(acc, option)
            if pinned is not None and pinned != getattr(request, option):
                raise RequestError(400, f"acceleration {request.acceleration!r} samples with {option}={pinned!r} (its "
                                        f"tuned plan); ask for {option}={pinned!r} or another acceleration")
        self._check_plan(request.model, workload, acc.solver or request.solver, acc.steps or request.steps)
        example = workload.make_cond(1, 0)
        if torch.is_tensor(example) and example.dim() == 1:  # class labels
            if request.cond is not None:
                raise RequestError(400, f"{request.model} is class-conditional: give class_label, not cond")
            self._check_class_label(request.model, workload, request.class_label)
        elif torch.is_tensor(example):
            if request.class_label is not None:
                raise RequestError(400, f"{request.model} takes embeddings: give cond, not class_label")
            if request.cond is not None and [len(request.cond), len(request.cond[0])] != list(example.shape[1:]):
                raise RequestError(400, f"cond must be {list(example.shape[1:])} for {request.model}, got "
                                        f"[{len(request.cond)}, {len(request.cond[0])}]")
        if request.output == "png" and not self.pixels(workload):
            raise RequestError(400, f"{request.model} samples latents, not pixels: ask for output='latents'")
        return workload

    @staticmethod
    def _check_class_label(model: str, workload: zoo.Workload, label: int | None) -> None:
        """A class label below the model's unconditional class (its number of classes)."""
        classes = int(workload.make_uncond(1)[0]) if workload.make_uncond else None
        if label is not None and classes is not None and label >= classes:
            raise RequestError(400, f"class_label {label} out of range: {model} has classes 0-{classes - 1}")

    def _check_plan(self, model: str, workload: zoo.Workload, solver: str, steps: int) -> None:
        """RequestError (400) when ``solver`` cannot sample ``model`` in ``steps`` steps (LCM beyond its
        distillation grid, a flow solver on a noise-prediction model, ...), saying what to ask for instead."""
        key = (model, solver, steps)
        with self._plan_lock:
            if key not in self._plan_problems:
                self._plan_problems[key] = plan_problem(model, workload, solver, steps)
        if self._plan_problems[key] is not None:
            raise RequestError(400, self._plan_problems[key])

    @staticmethod
    def pixels(workload: zoo.Workload) -> bool:
        return workload.data_range == 2.0 and workload.den.sample_shape[0] in (1, 3)

    def key(self, request: GenerateRequest) -> tuple:
        """Requests with equal keys share a model batch: (model, acceleration, solver, steps, guidance, cond kind),
        guidance being None (unguided), "per-row" (any scales, combined per row) or the scale itself."""
        guided = request.guidance_scale is not None and request.guidance_scale != 1.0
        acc = self.config.accelerations.get(request.acceleration)
        per_row = acc is not None and acc.adaptive_guidance is None and acc.early_exit is None
        guidance = None if not guided else ("per-row" if per_row else request.guidance_scale)
        return (request.model, request.acceleration, request.solver, request.steps, guidance, request.cond is not None)

    # ------------------------------------------------------------------ sampling

    def _sampler(self, key: tuple, workload: zoo.Workload):
        from diffrt.bench.benchmark import scheduler_options  # noqa: PLC0415
        from diffrt.runtime.optimized import optimize  # noqa: PLC0415

        model, acceleration, solver, steps, guidance, _ = key
        guidance = None if guidance == "per-row" else guidance  # the unguided plan: RowGuidance combines CFG
        if key in self._samplers:
            self._samplers.move_to_end(key)
            return self._samplers[key]
        acc = self.config.accelerations[acceleration]
        if (model, acceleration) not in self._optimized:
            self._optimized[(model, acceleration)] = optimize(workload.den, config=acc)
        sampler = acc.sampler(self._optimized[(model, acceleration)], solver, steps, guidance_scale=guidance,
                              **scheduler_options(workload, acc.solver or solver))
        self._samplers[key] = sampler
        while len(self._samplers) > 32:
            self._samplers.popitem(last=False)
        return sampler

    def run(self, requests: list[GenerateRequest]) -> list[Result]:
        """Sample a batch of requests that share one :meth:`key`; one result per request, in order."""
        keys = {self.key(r) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must share one key, got {len(keys)}")
        key = keys.pop()
        workload = self.check(requests[0])
        noise = torch.cat([workload.noise(1, r.seed) for r in requests])
        cond = self._conditions(workload, requests)
        guided = key[4] is not None
        uncond = workload.make_uncond(len(requests)) if guided and workload.make_uncond else None
        with self.lock:
            sampler = self._sampler(key, workload)
            if key[4] == "per-row":
                from diffrt.runtime import Sampler  # noqa: PLC0415

                scales = torch.tensor([r.guidance_scale for r in requests], dtype=torch.float32, device=self.device)
                sampler = Sampler.from_plan(RowGuidance(sampler.denoiser, uncond, scales), sampler.plan,
                                            backend=sampler.backend)
                guided = False  # the wrapper runs both branches
            start = time.perf_counter()
            with torch.no_grad():
                out = sampler.sample(noise, cond=cond, uncond=uncond if guided else None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            latency = (time.perf_counter() - start) * 1e3
        if not torch.isfinite(out).all():
            raise RuntimeError("the model produced non-finite samples")
        out = out.float().cpu()
        return [Result(out[i], len(requests), latency) for i in range(len(requests))]

    def run_mixed(self, requests: list[GenerateRequest]) -> list[Result | Exception]:
        """Any requests: grouped by key, each group one batch (what Ray Serve's ``@serve.batch`` hands in)."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self.key(request), []).append(index)
        results: list[Result | Exception] = [RuntimeError("not run")] * len(requests)
        for indices in groups.values():
            try:
                for index, result in zip(indices, self.run([requests[i] for i in indices])):
                    results[index] = result
            except Exception as error:  # noqa: BLE001 - each request gets its group's error
                for index in indices:
                    results[index] = error
        return results

    def _conditions(self, workload: zoo.Workload, requests: list[GenerateRequest]) -> Any:
        example = workload.make_cond(1, 0)
        if not torch.is_tensor(example):
            return None
        if example.dim() == 1:
            null = int(workload.make_uncond(1)[0]) if workload.make_uncond else 0
            labels = [null if r.class_label is None else r.class_label for r in requests]
            return torch.tensor(labels, device=self.device)
        rows = [torch.tensor(r.cond, dtype=torch.float32) if r.cond is not None else workload.make_cond(1, r.seed)[0].cpu()
                for r in requests]
        return torch.stack(rows).to(self.device)

    # ------------------------------------------------------------------ streams

    def stream_pipeline(self, config: StreamConfig):
        """A StreamPipeline (img2img, the stream's class as its condition) for one WebSocket."""
        from diffrt.runtime.stream import StreamPipeline  # noqa: PLC0415

        if config.model not in self.config.models:
            raise RequestError(404, f"unknown model {config.model!r}; this server has {', '.join(self.config.models)}")
        workload = self.workload(config.model)
        if not self.pixels(workload):
            raise RequestError(400, f"{config.model} samples latents: streams take pixel models")
        if max(config.t_index_list) >= config.num_inference_steps:
            raise RequestError(400, "t_index_list entries must be below num_inference_steps")
        self._check_class_label(config.model, workload, config.class_label)
        cond = None if config.class_label is None else torch.tensor(config.class_label, device=self.device)
        return StreamPipeline(workload.den, t_index_list=tuple(config.t_index_list),
                              num_inference_steps=config.num_inference_steps, cond=cond, seed=config.seed,
                              device=self.device)

    def stream_tick(self, pipe, frame: torch.Tensor):
        """One tick of ``pipe`` with ``frame``: its StreamResult (a frame that failed in the tick comes back as
        a result with ``error``). A frame the stream cannot take raises RequestError(400) and changes nothing;
        a tick that fails because the model fails on its own raises :class:`StreamModelError`."""
        expected = tuple(pipe.den.sample_shape) if getattr(pipe, "den", None) is not None else None
        if expected is not None and tuple(frame.shape) != expected:
            raise RequestError(400, f"a frame must be {list(expected)}, got {list(frame.shape)}")
        if not torch.isfinite(frame).all():
            raise RequestError(400, "the frame holds NaN or infinite values")
        frame = frame.to(self.device)
        try:
            pipe.check_frame(frame)
        except (TypeError, ValueError) as error:
            raise RequestError(400, str(error)) from error
        with self.lock:
            try:
                return pipe.tick(frame)
            except Exception as error:  # noqa: BLE001 - the frame passed its checks: the model failed on its own
                raise StreamModelError(f"{type(error).__name__}: {error}") from error

    def memory_bytes(self) -> float:
        return float(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else math.nan
