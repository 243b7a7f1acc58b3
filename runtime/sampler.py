"""Sampler: a solver plan, guidance, and the denoising loop.

The loop is device-driven: the step index is a device scalar, the model timestep, its input
scale and the solver coefficients are read from device tables by that index, and each step
is one fused kernel (``diffrt.kernels.solver_step``). Nothing in the loop reads a value back
to the host, so the loop can be captured in a CUDA graph.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffrt.kernels import PreparedStep, solver_step

from . import conditions
from .denoiser import Denoiser
from .early_exit import ExitState, exiting, has_exit_heads
from .residency import LaggedRead
from .solvers import plan_for, plan_from_scheduler
from .solvers.plan import SolverPlan

log = logging.getLogger(__name__)


@dataclass
class SamplerState:
    """A trajectory in flight: the sample, the history slots, the pre-drawn step noise
    [n_noise, *x.shape] and the device-side step index (0-dim int64). The step kernel is bound to
    these buffers on the first step (``prepared``): update them in place, never replace them."""

    x: torch.Tensor
    history: torch.Tensor | None
    noise: torch.Tensor | None
    step: torch.Tensor
    prepared: PreparedStep | None = field(default=None, repr=False)  # the step kernel bound to these buffers


class Sampler:
    """Sample from a denoiser with a solver given by name.

    Args:
        denoiser: a :class:`Denoiser` (or anything with its call signature and a ``schedule``).
        solver: a preset name (``diffrt.runtime.solvers.PRESETS``): ddim, euler, euler-ancestral,
            heun, dpmpp-1m/2m/3m, dpmpp-2m-sde, unipc, deis, lcm, flow-euler.
        steps: number of inference steps.
        guidance_scale: classifier-free guidance scale; None runs the conditional branch only.
        adaptive_guidance: None, True (threshold ``DEFAULT_ADAPTIVE_THRESHOLD``) or a cosine-similarity
            threshold: a sample drops its unconditional pass once its conditional and unconditional
            predictions agree that closely (``sampler.stats`` reports the model evaluations saved).
        linear_ag: fitted :class:`~diffrt.runtime.linear_ag.LinearAG` coefficients: at their steps the
            unconditional pass is estimated from past predictions instead of evaluated (with or
            without adaptive guidance; ``sampler.stats`` counts the evaluations saved).
        early_exit: None, True (``DEFAULT_EXIT_THRESHOLD``) or an uncertainty threshold: in a model with
            exit heads each row stops at the first exit whose uncertainty is below it
            (``sampler.stats["early_exit"]`` reports the blocks saved).
        early_exit_scope: "sample" (rows exit one by one, the rest run compacted) or "batch" (the
            batch stops together at the first exit where every row is confident: static shapes).
        early_exit_graphs: run the segments between exits as CUDA graphs (one per padded batch bucket;
            eager off CUDA).
        early_exit_sync: read the confident rows at every exit (one blocking read each) instead of planning the
            compacted batches from the previous model calls (:mod:`diffrt.runtime.early_exit`; no host sync).
        backend: the solver-step backend ("auto", "reference", "cpu", "cuda").
        generator_parity: draw stochastic solvers' step noise where ``sample``'s generator lives and copy it to
            the noise's device, as diffusers does (its numbers with a CPU generator and CUDA noise, at one
            host-to-device copy per draw); by default a generator on another device seeds one on the noise's.
        options: the scheduler class's options under diffusers' names (``use_karras_sigmas=True``,
            ``eta=0.5``, ...).
    """

    def __init__(self, denoiser: Denoiser, solver: str = "dpmpp-2m", steps: int = 20,
                 guidance_scale: float | None = None, adaptive_guidance: Any = None, early_exit: Any = None,
                 linear_ag: Any = None, early_exit_scope: str = "sample", early_exit_graphs: bool = False,
                 early_exit_sync: bool = False, backend: str = "auto", generator_parity: bool = False, **options: Any):
        plan = plan_for(solver, denoiser.schedule, steps, **options)
        self._init(denoiser, plan, guidance_scale, adaptive_guidance, early_exit, backend, linear_ag, early_exit_scope,
                   early_exit_graphs, early_exit_sync)
        self.generator_parity = bool(generator_parity)

    @classmethod
    def from_plan(cls, denoiser: Denoiser, plan: SolverPlan, guidance_scale: float | None = None,
                  backend: str = "auto") -> "Sampler":
        """A sampler running a prepared plan."""
        self = cls.__new__(cls)
        self._init(denoiser, plan, guidance_scale, None, None, backend)
        return self

    @classmethod
    def from_scheduler(cls, model: Any, scheduler: Any, num_inference_steps: int,
                       guidance_scale: float | None = None, backend: str = "auto", **step_options: Any) -> "Sampler":
        """Reproduce a configured diffusers scheduler's trajectory.

        ``model`` is a diffusers model or a :class:`Denoiser`; step-time options of the scheduler
        (``eta=`` for DDIM) are keyword arguments. An option not reproduced raises NotImplementedError.
        """
        den = model if isinstance(model, Denoiser) else Denoiser.from_diffusers(model, scheduler.config)
        plan = plan_from_scheduler(scheduler, num_inference_steps, schedule=den.schedule, **step_options)
        return cls.from_plan(den, plan, guidance_scale, backend)

    def _init(self, denoiser, plan, guidance_scale, adaptive_guidance, early_exit, backend, linear_ag=None,
              early_exit_scope: str = "sample", early_exit_graphs: bool = False, early_exit_sync: bool = False) -> None:
        self.early_exit = _early_exit_threshold(early_exit, denoiser)
        if early_exit_scope not in ("sample", "batch"):
            raise ValueError(f"early_exit_scope must be 'sample' or 'batch', got {early_exit_scope!r}")
        self.early_exit_scope = early_exit_scope
        self.early_exit_graphs = bool(early_exit_graphs)
        self.early_exit_sync = bool(early_exit_sync)
        self._exit_memory: dict[tuple, dict[int, list[float]]] = {}  # early exit's plans, per trajectory step
        if self.early_exit_graphs and getattr(denoiser, "int8_mode", None) == "static":
            raise ValueError("early_exit_graphs=True with a calibrated INT8 denoiser: the segment graphs would keep "
                             "the capturing call's timestep groups; use early_exit_graphs=False with int8")
        if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
                                           or not math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be None or a finite number, got {guidance_scale!r}")
        if backend not in STEP_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(STEP_BACKENDS)}, got {backend!r}")
        self.adaptive_guidance = _adaptive_threshold(adaptive_guidance)
        if self.adaptive_guidance is not None and guidance_scale is None:
            raise ValueError("adaptive_guidance drops the unconditional pass of CFG: it needs a guidance_scale")
        if linear_ag is not None:
            if guidance_scale is None:
                raise ValueError("linear_ag estimates the unconditional pass of CFG: it needs a guidance_scale")
            if not hasattr(linear_ag, "estimate"):
                raise TypeError(f"linear_ag must be a fitted LinearAG (diffrt.runtime.linear_ag.fit_linear_ag), "
                                f"got {type(linear_ag).__name__}")
            linear_ag.check_plan(plan)
        self.linear_ag = linear_ag
        self.stats: dict[str, Any] = {}
        check_plan = getattr(denoiser, "check_plan", None)  # e.g. an INT8 calibration made for one plan
        if check_plan is not None:
            check_plan(plan)
        self.denoiser = denoiser
        self.plan = plan
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.backend = backend
        self.generator_parity = False
        self._device_tables: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._input_scales = plan.input_scales().tolist()  # host copies: the loop's per-step Python floats
        self._timestep_rows: dict[tuple, list[torch.Tensor]] = {}

    @property
    def steps(self) -> int:
        """Model evaluations per sample (2N-1 for Heun)."""
        return self.plan.steps

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coefficients, int table, model timesteps fp32, input scales fp32) on ``device``, built once."""
        key = (str(device),)
        if key not in self._device_tables:
            table, itable = self.plan.tables(self.guidance_scale)
            self._device_tables[key] = (table.to(device), itable.to(device),
                                        self.plan.timesteps().to(torch.float32).to(device),
                                        self.plan.input_scales().to(torch.float32).to(device))
        return self._device_tables[key]

    def timestep_rows(self, device: torch.device, rows: int) -> list[torch.Tensor]:
        """The model timesteps of every step as [rows] views of the device table, built once per device and rows."""
        key = (str(device), rows)
        if key not in self._timestep_rows:
            self._timestep_rows[key] = list(self.tables(device)[2].view(-1, 1).expand(-1, rows).unbind(0))
        return self._timestep_rows[key]

    def draw_noise(self, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                   generator: torch.Generator | list[torch.Generator] | None, generator_parity: bool = False
                   ) -> torch.Tensor | None:
        """All step noise of the trajectory, [n_noise, *shape], drawn in the reference's order.

        A generator on another device than the noise (a CPU generator, CUDA noise) seeds a generator on the
        noise's device, which draws there: nothing is copied from the host. ``generator_parity=True`` draws
        where the generator lives and copies, as diffusers' ``randn_tensor`` does (the same numbers as
        diffusers with a CPU generator; one host-to-device copy per draw)."""
        if self.plan.n_noise == 0:
            return None
        noise_dtype = self.plan.noise_dtype or dtype
        if not generator_parity:
            generator = _on_device(generator, device)
        one = generator is None or isinstance(generator, torch.Generator)
        if one and noise_dtype == dtype and (generator is None or generator.device.type == device.type):  # in place
            noise = torch.empty((self.plan.n_noise, *shape), dtype=dtype, device=device)
            for k in range(self.plan.n_noise):
                noise[k].normal_(generator=generator)
            return noise
        draws = [randn_tensor(shape, generator, device, noise_dtype).to(dtype) for _ in range(self.plan.n_noise)]
        return torch.stack(draws)

    def sample(self, noise: torch.Tensor, cond: Any = None, uncond: Any = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               callback: Callable[[int, torch.Tensor], None] | None = None, check: bool = True) -> torch.Tensor:
        """Denoise unit Gaussian ``noise`` [B, *sample_shape] into samples.

        The schedule's initial scale (diffusers' ``init_noise_sigma``) is applied here. With a
        guidance scale, ``uncond`` is the unconditional conditioning (e.g. the null class).
        ``generator`` seeds the step noise of stochastic solvers. ``callback(i, x)`` sees the
        sample after each step (it may sync; leave it out for speed). ``check=False`` skips the
        input validation, whose NaN scan syncs the host (needed inside CUDA graph capture).
        """
        cond, uncond = _as_condition(cond, "cond", noise), _as_condition(uncond, "uncond", noise)
        if check:
            self._check_noise(noise)
            self._check_conditions(cond, uncond, noise.shape[0])
        self.stats = {}
        if self.early_exit is not None:
            memory = self._exit_memory.setdefault((self.early_exit, self.early_exit_scope), {})
            state = ExitState(self.early_exit, per_sample=self.early_exit_scope == "sample", graphs=self.early_exit_graphs,
                              synchronous=self.early_exit_sync, memory=memory)
            with exiting(state):
                x = self._sample(noise, cond, uncond, generator, callback)
            self.stats = {**self.stats, "early_exit": state.stats}
            return x
        return self._sample(noise, cond, uncond, generator, callback)

    def _sample(self, noise, cond, uncond, generator, callback) -> torch.Tensor:
        guided = self.guidance_scale is not None
        if guided and uncond is None:
            raise ValueError("guidance_scale is set, so sample() needs uncond (the unconditional conditioning)")
        state = self.start(noise, generator)
        if guided and (self.adaptive_guidance is not None or self.linear_ag is not None):
            return self._sample_adaptive(state, cond, uncond, callback)
        batch = noise.shape[0]
        if guided:  # one condition for all samples is broadcast before CFG stacks [uncond; cond]
            model_cond = conditions.cat(conditions.expand(uncond, batch), conditions.expand(cond, batch))
        else:
            model_cond = cond
        # host-known per-step values: the input scale as a kernel scalar, the model timesteps as rows of a device
        # table; no per-step gather, no host read. Each step writes the next model input (c_in * x, [x; x] under
        # CFG) into one buffer beside x, so a step is the model and one fused kernel (on CPU; elsewhere a multiply
        # follows it). Like x itself, which is the input where c_in = 1, the buffer is rewritten every step: a
        # model must not keep its input past its call.
        scales, rows = self._input_scales, 2 * batch if guided else batch
        timesteps = self.timestep_rows(state.x.device, rows)
        x_in = state.x if scales[0] == 1.0 else state.x * scales[0]
        if guided:
            x_in = torch.cat([x_in, x_in])
        buffer, last = (None if x_in is state.x else x_in), self.plan.steps - 1
        for i in range(self.plan.steps):
            out = self.denoiser(x_in, timesteps[i], model_cond)
            out_uncond, out_cond = out.chunk(2) if guided else (None, out)
            if i < last and (guided or scales[i + 1] != 1.0):
                if buffer is None:
                    buffer = torch.empty_like(state.x)
                x_in = buffer
                self.step(state, out_cond, out_uncond, buffer, scales[i + 1])
            else:
                x_in = self.step(state, out_cond, out_uncond)
            if callback is not None:
                callback(i, state.x)
        return state.x

    def _sample_adaptive(self, state: "SamplerState", cond: Any, uncond: Any, callback) -> torch.Tensor:
        """Guidance that skips unconditional passes, counted in ``self.stats``; no host sync in the loop.

        Adaptive guidance: a sample keeps its unconditional pass until cos(cond, uncond prediction) >=
        the threshold, then runs conditional-only (uncond := cond, which the folded CFG step turns into
        the plain conditional step) for the rest of its trajectory. The decision is a device mask,
        applied at once; the host learns how many samples are still guided through a non-blocking read
        (:class:`~diffrt.runtime.residency.LaggedRead`) that may arrive a step or more late, and runs the
        unconditional pass on that many rows: the still-guided ones first (a stable sort of the mask),
        then rows already dropped, whose unconditional output the mask discards. The samples are the ones
        a synchronous decision gives; the rows computed follow the decisions one read behind. LinearAG:
        at its steps the still-guided samples' unconditional predictions are estimated from the
        previous step's (the mask never changes without adaptive guidance: nothing to read)."""
        batch = state.x.shape[0]
        if not (conditions.is_condition(cond) and conditions.is_condition(uncond)):
            raise TypeError("adaptive guidance needs cond and uncond as tensors or dicts of tensors")
        cond, uncond = conditions.expand(cond, batch), conditions.expand(uncond, batch)
        device = state.x.device
        guided = torch.ones(batch, dtype=torch.bool, device=device)
        reader = LaggedRead(torch.zeros((), dtype=torch.int64, device=device)) if self.adaptive_guidance is not None else None
        active = batch  # the host's bound on the guided samples: never below the device's count
        evaluations, per_step, estimated_steps = 0, [], 0
        previous: tuple[torch.Tensor, torch.Tensor] | None = None
        scales = self._input_scales
        timesteps = self.tables(device)[2]
        shape = (-1, *([1] * (state.x.dim() - 1)))
        for i in range(self.plan.steps):
            x_in = state.x if scales[i] == 1.0 else state.x * scales[i]
            t = timesteps[i].expand(batch)
            if reader is not None and (seen := reader.latest()) is not None:
                active = min(active, int(seen))
            estimate = bool(active) and previous is not None and self.linear_ag is not None and self.linear_ag.estimates(i)
            if active and not estimate:
                if active == batch:
                    out = self.denoiser(torch.cat([x_in, x_in]), torch.cat([t, t]), conditions.concat(uncond, cond))
                    out_rows_uncond, out_cond = out[:batch], out[batch:]
                    out_rows_cond, out_uncond = out_cond, out_rows_uncond
                else:  # the guided samples first, then dropped ones up to the host's count
                    rows = torch.argsort(guided.to(torch.uint8), descending=True, stable=True)[:active]
                    out = self.denoiser(torch.cat([x_in.index_select(0, rows), x_in]),
                                        torch.cat([t[:active], t]), conditions.concat(conditions.select(uncond, rows), cond))
                    out_rows_uncond, out_cond = out[:active], out[active:]
                    out_rows_cond = out_cond.index_select(0, rows)
                    out_uncond = out_cond.index_copy(0, rows, out_rows_uncond)
                out_uncond = torch.where(guided.view(shape), out_uncond, out_cond)
                if self.adaptive_guidance is not None:
                    similar = torch.nn.functional.cosine_similarity(
                        out_rows_uncond.flatten(1).float(), out_rows_cond.flatten(1).float(), dim=1)
                    keep = similar < self.adaptive_guidance
                    if active == batch:
                        guided = guided & keep
                    else:
                        guided = guided.index_put((rows,), guided.index_select(0, rows) & keep)
                    reader.request(guided.sum())
                evaluations += batch + active
            else:
                out_cond = self.denoiser(x_in, t, cond)
                out_uncond = out_cond
                if estimate:
                    guess = self.linear_ag.estimate(i, out_cond, previous[0], previous[1], x_in)
                    out_uncond = torch.where(guided.view(shape), guess, out_cond)
                    estimated_steps += 1
                evaluations += batch
            per_step.append(0 if estimate else active)
            previous = (out_cond, out_uncond)
            self.step(state, out_cond, out_uncond)
            if callback is not None:
                callback(i, state.x)
        full = 2 * batch * self.plan.steps
        self.stats = {"evaluations": evaluations, "cfg_evaluations": full, "saved_fraction": 1 - evaluations / full,
                      "guided_per_step": per_step, "estimated_steps": estimated_steps}
        return state.x

    def start(self, noise: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
              ) -> "SamplerState":
        """A fresh trajectory from unit noise: x = init_noise_sigma * noise, empty history, step 0."""
        reset_cache = getattr(self.denoiser, "reset_cache", None)  # a step cache holds one trajectory
        if reset_cache is not None:
            reset_cache()
        device = noise.device
        x = noise * self.plan.init_noise_sigma
        history = torch.zeros((self.plan.n_slots, *x.shape), dtype=x.dtype, device=device) if self.plan.n_slots else None
        return SamplerState(x, history, self.draw_noise(x.shape, x.dtype, device, generator, self.generator_parity),
                            torch.zeros((), dtype=torch.int64, device=device))

    def model_inputs(self, state: "SamplerState") -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in * x, model timesteps [B]) for the state's current step, read on the device."""
        _, _, timesteps, scales = self.tables(state.x.device)
        idx = state.step.reshape(1)
        x_in = state.x * scales.index_select(0, idx).to(state.x.dtype)
        return x_in, timesteps.index_select(0, idx).expand(state.x.shape[0])

    def step(self, state: "SamplerState", out_cond: torch.Tensor, out_uncond: torch.Tensor | None = None,
             scaled: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """One fused solver step from the model outputs; advances ``state`` in place, returns x. ``scaled`` (a
        buffer of one or more copies of x along dim 0, apart from x) also receives ``scale * x``, the next model
        input."""
        if state.prepared is None:  # checked and dispatched once per trajectory
            table, itable, _, _ = self.tables(state.x.device)
            state.prepared = PreparedStep(state.x, out_cond, out_uncond, state.history, state.noise, table, itable,
                                          state.step, state.x, self.backend)
        state.prepared(state.x, out_cond, out_uncond, state.x, scaled, scale, advance=True)
        return state.x

    def timed_sample(self, noise: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, float]:
        """``sample()`` and its wall time in seconds (synchronising the device around it)."""
        _sync(noise.device)
        start = time.perf_counter()
        x = self.sample(noise, **kwargs)
        _sync(noise.device)
        return x, time.perf_counter() - start

    def _check_noise(self, noise: torch.Tensor) -> None:
        if not torch.is_tensor(noise):
            raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if noise.dim() < 2:
            raise ValueError(f"noise must be [B, *sample_shape], got shape {tuple(noise.shape)}")
        shape = getattr(self.denoiser, "sample_shape", None)
        if shape is not None and None not in shape:
            any_resolution = getattr(self.denoiser, "any_resolution", False)
            found = tuple(noise.shape[1:2]) if any_resolution else tuple(noise.shape[1:])
            if len(noise.shape[1:]) != len(shape) or found != tuple(shape[:len(found)]):
                raise ValueError(f"noise has sample shape {tuple(noise.shape[1:])}; the denoiser samples {tuple(shape)}"
                                 + (" (any H x W, these channels)" if any_resolution else ""))
        model_device = getattr(self.denoiser, "device", None)
        if model_device is not None and model_device.type != noise.device.type:
            raise ValueError(f"noise is on {noise.device}, the model on {model_device}: move one of them")
        if not torch.isfinite(noise).all():
            raise ValueError("noise contains NaN or Inf")

    def _check_conditions(self, cond: Any, uncond: Any, batch: int) -> None:
        """One condition per sample (or one for all), class labels within the model's classes."""
        for name, value in (("cond", cond), ("uncond", uncond)):
            if not conditions.is_condition(value):
                continue  # None, or a custom model's own kind of condition
            rows = conditions.batch_of(value)
            if rows is not None and rows not in (1, batch):
                raise ValueError(f"{name} has {rows} rows for {batch} samples: give one per sample, or one for all")
            classes = getattr(self.denoiser, "condition_classes", None)
            if classes is not None and torch.is_tensor(value) and not value.is_floating_point() and value.dim() > 1:
                raise ValueError(f"{name} holds class labels of shape {tuple(value.shape)}; give one label per "
                                 "sample ([B]) or one for all")
            if classes is not None and torch.is_tensor(value) and not value.is_floating_point() and value.numel():
                low, high = int(value.min()), int(value.max())
                if low < 0 or high >= classes:
                    raise ValueError(f"{name} holds class labels {low}..{high}; this model takes 0..{classes - 1}")


STEP_BACKENDS = ("auto", "reference", "cpu", "cuda")  # of diffrt.kernels.solver_step

# cosine similarity: on both digits models 29-30 % of the evaluations saved at <= 0.5 points of class
# accuracy (bench/results/cpu-20261201-adaptive-guidance.md; 0.9 saves 41-43 % but costs 2 points on the DiT)
DEFAULT_ADAPTIVE_THRESHOLD = 0.95


# exit uncertainty (tanh of the mean abs error), per sample: 56 % of the digits DiT's blocks saved at 0.6 points
# of class accuracy (bench/results/cpu-20261201-adaptive-guidance.md; 0.1 saves 29 % at none, 0.3 costs 13 points)
DEFAULT_EXIT_THRESHOLD = 0.2


def _as_condition(value: Any, name: str, noise: torch.Tensor) -> Any:
    """A condition given as Python numbers (a class label, a list of them) as a tensor on the noise's device
    (converted once per ``sample()``, before the loop); tensors, dicts and None as they are."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a tensor, a dict of tensors, a class label or a list of them; got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral) or (isinstance(value, (list, tuple)) and value
                                               and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                       for v in value)):
        return torch.as_tensor(value, dtype=torch.int64, device=noise.device)
    if isinstance(value, (numbers.Number, list, tuple)):
        raise TypeError(f"{name} must be a tensor, a dict of tensors, a class label or a list of them; got "
                        f"{type(value).__name__} {value!r}")
    return value


def _early_exit_threshold(option: Any, denoiser: Any) -> float | None:
    """None (off), True (the default) or an uncertainty threshold in [0, 1]; the model needs exit heads."""
    if option is None or option is False:
        return None
    threshold = DEFAULT_EXIT_THRESHOLD if option is True else option
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= float(threshold) <= 1:
        raise ValueError(f"early_exit must be None, True or an uncertainty threshold in [0, 1], got {option!r}")
    if getattr(denoiser, "step_cache", None) is not None:
        raise ValueError("early_exit and a step cache both skip blocks of the same transformer and do not compose: "
                         "use one of them")
    if not has_exit_heads(getattr(denoiser, "model", None)):
        raise ValueError("early_exit needs a model with exit heads (diffrt.runtime.early_exit.EarlyExitModel; "
                         "models.load('digits-dit') ships them, diffrt.runtime.models.exits.train_exit_heads trains them)")
    return float(threshold)


def _adaptive_threshold(option: Any) -> float | None:
    """None (off), True (the default threshold) or a cosine-similarity threshold > -1 (above 1: never drops)."""
    if option is None or option is False:
        return None
    if option is True:
        return DEFAULT_ADAPTIVE_THRESHOLD
    if isinstance(option, (int, float)) and not isinstance(option, bool) and float(option) > -1:
        return float(option)
    raise ValueError(f"adaptive_guidance must be None, True or a cosine-similarity threshold, got {option!r}")


def randn_tensor(shape, generator, device, dtype) -> torch.Tensor:
    """torch.randn as diffusers' randn_tensor draws it (a CPU generator draws on the CPU, then moves; a list
    of generators draws one row each)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn_tensor((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _on_device(generator: Any, device: torch.device) -> Any:
    """``generator``, or where it lives on another device, a generator on ``device`` seeded from it (one draw
    of the original: reproducible from its seed; a list is converted generator by generator)."""
    if isinstance(generator, (list, tuple)):
        return [_on_device(g, device) for g in generator]
    if generator is None or generator.device == device:
        return generator
    seeded = torch.Generator(device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
    return seeded


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
