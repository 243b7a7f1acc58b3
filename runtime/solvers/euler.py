"""Euler, Euler ancestral and Heun (Karras et al. 2022), as diffusers' Euler/EulerAncestral/HeunDiscreteScheduler.

All three work in diffusers' VE parametrisation x = x0 + sigma * eps (the sample is the VP sample
times sqrt(sigma^2 + 1)); the model sees c_in * x with c_in = 1 / sqrt(sigma^2 + 1) at a float
timestep. With x0 = X x + M m (epsilon: X = 1, M = -sigma; v: X = 1/(sigma^2+1),
M = -sigma/sqrt(sigma^2+1); sample: X = 0, M = 1) and the ODE slope d = (x - x0) / sigma:

    Euler:     x' = x + (s_next - s) d
    ancestral: s_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2), s_down = sqrt(s_next^2 - s_up^2),
               x' = x + (s_down - s) d + s_up * noise                   (noise on every step)
    Heun:      x_mid = x + dt d(x, s),  dt = s_next - s                  (row 2k; x saved in slot 0)
               x'    = 0.5 H0 + 0.5 x_mid + 0.5 dt d(x_mid, s_next)     (row 2k+1, same as
               x + dt (d1 + d2) / 2 since d1 = (x_mid - H0) / dt); the last step (s_next = 0) is Euler.
    Euler with s_churn: gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1) where s_tmin <= s <= s_tmax,
               s_hat = s (gamma + 1), x_hat = x + s_noise sqrt(s_hat^2 - s^2) noise, then the Euler step
               from x_hat at s_hat (epsilon uses s_hat in x0, v uses s), x' = x_hat + (s_next - s_hat) d.

Sigma grids, as set_timesteps: timesteps from the spacing (float32), sigmas interpolated linearly in t
on sqrt((1 - abar) / abar) (or log-linear, Euler only), optionally Karras / exponential with timesteps
from sigma_to_t; then the final sigma (0, or Euler's sigma_min option). Scalar coefficients are
computed in float32 torch, as diffusers does, then combined in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import STEP_OPTIONS, VP_OPTIONS, register
from .common import check_first_timestep, check_step_options, check_unsupported
from .plan import Combo, SolverPlan, StepRow
from .sigmas import exponential_sigmas, final_sigma, karras_sigmas, sigma_to_t, ve_sigmas, zero_snr_alphas_cumprod

CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
STEP_OPTIONS["EulerDiscreteScheduler"] = CHURN_OPTIONS
UNSUPPORTED = {"use_beta_sigmas": False}
EULER_OPTIONS = VP_OPTIONS + ("interpolation_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                              "sigma_min", "sigma_max", "timestep_spacing", "timestep_type", "steps_offset",
                              "rescale_betas_zero_snr", "final_sigmas_type")
ANCESTRAL_OPTIONS = VP_OPTIONS + ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
HEUN_OPTIONS = VP_OPTIONS + ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "clip_sample",
                             "clip_sample_range", "timestep_spacing", "steps_offset")
# Options of EulerDiscreteScheduler that the ancestral class lacks (Heun has the use_* ones): set away
# from these defaults in a preset's options they would silently change nothing, so they are refused.
EULER_ONLY = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero"}


def discrete_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """Euler-family timesteps (descending float32): linspace (not rounded), leading or trailing."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = num_train / steps
        return np.arange(num_train, 0, -ratio).round().copy().astype(np.float32) - np.float32(1)
    raise NotImplementedError(f"timestep_spacing={spacing!r} is not supported (linspace, leading, trailing)")


def vp_sigma_grid(schedule: NoiseSchedule, config: dict, steps: int, name: str) -> tuple[np.ndarray, torch.Tensor]:
    """(model timesteps float32 [N], sigmas float32 [N+1]) of an Euler-family set_timesteps(steps)."""
    if schedule.kind != "vp":
        raise ValueError(f"{name} needs a discrete (VP) noise schedule, got a {schedule.kind} schedule")
    check_unsupported(config, UNSUPPORTED, name)
    abar = schedule.alphas_cumprod
    if config.get("rescale_betas_zero_snr", False):
        if float(abar[-1]) != 0.0:
            raise ValueError(f"{name}: rescale_betas_zero_snr is set but the denoiser's schedule was not rescaled")
        abar = zero_snr_alphas_cumprod(abar)
    train_sigmas = ve_sigmas(abar)
    if not np.isfinite(train_sigmas).all():
        raise ValueError(f"{name}: the schedule has zero terminal SNR (infinite sigma_max); "
                         "the scheduler needs rescale_betas_zero_snr=True")
    log_sigmas = np.log(train_sigmas)
    n = schedule.num_train_timesteps
    if steps > n:
        raise ValueError(f"num_inference_steps={steps} exceeds num_train_timesteps={n}")
    timesteps = discrete_timesteps(config.get("timestep_spacing", "linspace"), n, steps,
                                   int(config.get("steps_offset", 0)))
    interpolation = config.get("interpolation_type", "linear")
    if interpolation == "linear":
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    elif interpolation == "log_linear":
        sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), steps + 1).exp().numpy()
    else:
        raise NotImplementedError(f"{name}: interpolation_type={interpolation!r} is not supported (linear, log_linear)")
    if config.get("use_karras_sigmas", False) or config.get("use_exponential_sigmas", False):
        sigma_min = config.get("sigma_min")
        sigma_max = config.get("sigma_max")
        sigma_min = float(sigmas[-1]) if sigma_min is None else sigma_min
        sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
        convert = karras_sigmas if config.get("use_karras_sigmas", False) else exponential_sigmas
        sigmas = convert(sigma_min, sigma_max, steps)
        timesteps = sigma_to_t(sigmas, log_sigmas)
    sigma_last = final_sigma(config, abar, name)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
    return timesteps.astype(np.float32), sigmas


def init_noise_sigma(sigmas: torch.Tensor, spacing: str) -> float:
    """diffusers' init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) otherwise."""
    max_sigma = sigmas.max()
    return float(max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5)


def input_scale(sigma: torch.Tensor) -> float:
    """c_in = 1 / sqrt(sigma^2 + 1) (float32 maths, as scale_model_input)."""
    return 1.0 / float((sigma**2 + 1) ** 0.5)


def x0_coefs(ptype: str, sigma: torch.Tensor, name: str, sigma_eps: torch.Tensor | None = None) -> tuple[float, float]:
    """(X, M) with x0 = X x + M m in the VE parametrisation; ``sigma_eps`` (default sigma) scales eps."""
    if ptype == "epsilon":
        return 1.0, -float(sigma if sigma_eps is None else sigma_eps)
    if ptype == "v_prediction":
        return 1.0 / float(sigma**2 + 1), float(-sigma / (sigma**2 + 1) ** 0.5)
    if ptype == "sample":
        return 0.0, 1.0
    raise NotImplementedError(f"{name}: prediction_type={ptype!r} is not supported")


def euler_update(x0_x: float, x0_m: float, sigma: float, dt: float, clipped: bool = False) -> Combo:
    """x + dt (x - x0) / sigma: in x and m (exact algebra), or in x and x0 when x0 is clipped."""
    r = dt / sigma
    if clipped:
        return Combo(x=1.0 + r, x0=-r)
    return Combo(x=1.0 + r * (1.0 - x0_x), model=-r * x0_m)


@register("EulerDiscreteScheduler", EULER_OPTIONS, presets={"euler": {}})
def build_euler(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of EulerDiscreteScheduler; step options s_churn, s_tmin, s_tmax, s_noise (as its step())."""
    name = "EulerDiscreteScheduler"
    check_step_options(step_options, CHURN_OPTIONS, name)
    s_churn = float(step_options.get("s_churn", 0.0))
    s_tmin, s_tmax = float(step_options.get("s_tmin", 0.0)), float(step_options.get("s_tmax", math.inf))
    s_noise = float(step_options.get("s_noise", 1.0))
    ptype = schedule.prediction_type
    timesteps, sigmas = vp_sigma_grid(schedule, config, steps, name)
    timestep_type = config.get("timestep_type", "discrete")
    if timestep_type not in ("discrete", "continuous"):
        raise NotImplementedError(f"{name}: timestep_type={timestep_type!r} is not supported")
    if timestep_type == "continuous" and ptype == "v_prediction":
        timesteps = np.array([float(0.25 * s.log()) for s in sigmas[:-1]], dtype=np.float32)
    check_first_timestep(timesteps, name)
    rows = []
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        x0_x, x0_m = x0_coefs(ptype, sigma, name, sigma_eps=sigma_hat)
        out = euler_update(x0_x, x0_m, float(sigma_hat), float(sigma_next - sigma_hat))
        if gamma > 0:  # x_hat = x + churn * noise enters linearly wherever x does (the row's x0 omits it)
            out.noise = out.x * s_noise * float((sigma_hat**2 - sigma**2) ** 0.5)
        rows.append(StepRow(timestep=float(t), c_in=input_scale(sigma), x0_x=x0_x, x0_model=x0_m, out=out,
                            noise=gamma > 0))
    spacing = config.get("timestep_spacing", "linspace")
    return SolverPlan("euler", rows, n_slots=0, init_noise_sigma=init_noise_sigma(sigmas, spacing),
                      options={"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise})


@register("EulerAncestralDiscreteScheduler", ANCESTRAL_OPTIONS, presets={"euler-ancestral": {}})
def build_euler_ancestral(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of EulerAncestralDiscreteScheduler (one noise draw per step, the last one with s_up = 0)."""
    name = "EulerAncestralDiscreteScheduler"
    check_step_options(step_options, (), name)
    ptype = schedule.prediction_type
    if ptype == "sample":
        raise NotImplementedError(f"{name}: prediction_type='sample' is not implemented (nor in diffusers)")
    check_unsupported(config, dict(EULER_ONLY, timestep_type="discrete"), name)
    timesteps, sigmas = vp_sigma_grid(schedule, config, steps, name)
    check_first_timestep(timesteps, name)
    rows = []
    for i, t in enumerate(timesteps):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x0_x, x0_m = x0_coefs(ptype, sigma_from, name)
        out = euler_update(x0_x, x0_m, float(sigma_from), float(sigma_down - sigma_from))
        out.noise = float(sigma_up)
        rows.append(StepRow(timestep=float(t), c_in=input_scale(sigma_from), x0_x=x0_x, x0_model=x0_m, out=out,
                            noise=True))
    return SolverPlan("euler-ancestral", rows, n_slots=0,
                      init_noise_sigma=init_noise_sigma(sigmas, config.get("timestep_spacing", "linspace")))


@register("HeunDiscreteScheduler", HEUN_OPTIONS, presets={"heun": {}})
def build_heun(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of HeunDiscreteScheduler: 2N-1 rows, one per model call (slot 0 keeps the stage's start)."""
    name = "HeunDiscreteScheduler"
    check_step_options(step_options, (), name)
    ptype = schedule.prediction_type
    heun_lacks = {k: v for k, v in EULER_ONLY.items() if not k.startswith("use_")}
    check_unsupported(config, dict(heun_lacks, rescale_betas_zero_snr=False, timestep_type="discrete"), name)
    timesteps, sigmas = vp_sigma_grid(schedule, config, steps, name)
    check_first_timestep(timesteps, name)
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    rows = []
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = float(sigma_next - sigma)
        if i > 0:  # second stage of the previous step: the model ran on x_mid at sigma (= its s_next)
            s_prev = sigmas[i - 1]
            x0_x, x0_m = x0_coefs(ptype, sigma, name)
            out = euler_update(x0_x, x0_m, float(sigma), float(sigma - s_prev), clip is not None).scaled(0.5)
            out.hist[0] = 0.5
            rows.append(StepRow(timestep=float(t), c_in=input_scale(sigma), x0_x=x0_x, x0_model=x0_m, out=out,
                                clip=clip))
        x0_x, x0_m = x0_coefs(ptype, sigma, name)
        out = euler_update(x0_x, x0_m, float(sigma), dt, clip is not None)
        writes = [(0, Combo(x=1.0))] if i < len(timesteps) - 1 else []
        rows.append(StepRow(timestep=float(t), c_in=input_scale(sigma), x0_x=x0_x, x0_model=x0_m, out=out,
                            writes=writes, clip=clip))
    return SolverPlan("heun", rows, n_slots=1,
                      init_noise_sigma=init_noise_sigma(sigmas, config.get("timestep_spacing", "linspace")))
