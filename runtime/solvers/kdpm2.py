"""DPM-Solver-2 in Katherine Crowson's k-diffusion form, as diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler.

diffusers' VE parametrisation x = x0 + s eps with sigmas s_0 > ... > s_{N-1} > s_N = 0 at the spaced
timesteps T_k (EulerDiscreteScheduler's grid; Karras sigmas with rounded t = sigma_to_t(s), exponential
sigmas with unrounded t). With x0 = X x + M m at level s (epsilon: X = 1, M = -s; v: X = 1/(s^2+1),
M = -s/sqrt(s^2+1)) and d(x, s) = (x - x0) / s, each step k is two model calls (the second at the
level s_mid, on x_mid, at timestep sigma_to_t(s_mid); the model sees x / sqrt(level^2 + 1)):

    KDPM2:     s_mid = exp((log s_k + log s_{k+1}) / 2)              (geometric mean)
               x_mid = x + (s_mid - s_k) d(x, s_k)                   (row 2k, x kept in slot 0)
               x'    = x + (s_{k+1} - s_k) d(x_mid, s_mid)            (row 2k+1)
    ancestral: s_up = sqrt(s_{k+1}^2 (s_k^2 - s_{k+1}^2) / s_k^2),  s_down = sqrt(s_{k+1}^2 - s_up^2),
               s_mid = exp((log s_k + log s_down) / 2)
               x_mid = x + (s_mid - s_k) d(x, s_k)                   (row 2k, x kept in slot 0)
               x'    = x + (s_down - s_k) d(x_mid, s_mid) + s_up z    (row 2k+1, z a fresh Gaussian draw)

The last step (to s_N = 0) has s_mid = 0 and is a single Euler call x' = x - s_{N-1} d(x, s_{N-1}) = x0,
so a trajectory is 2N - 1 model calls and (ancestral) N - 1 draws, in diffusers' order. The log-space
midpoints (torch lerp), s_up and s_down are computed in float32 torch and the midpoint timesteps with
diffusers' float32 sigma_to_t, as set_timesteps does. Karras and exponential sigmas use a sigma_min /
sigma_max left in the scheduler's config by another scheduler (diffusers reads them there).
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options, check_unsupported
from .euler import discrete_timesteps, init_noise_sigma, input_scale, x0_coefs
from .lms import foreign_sigma_range
from .plan import Combo, SolverPlan, StepRow
from .registry import VP_OPTIONS, register
from .sigmas import exponential_sigmas, karras_sigmas, sigma_to_t, ve_sigmas

OPTIONS = VP_OPTIONS + ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing",
                        "steps_offset")
UNSUPPORTED = {"use_beta_sigmas": False}


def k_grid(schedule: NoiseSchedule, config: dict, steps: int,
           name: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(timesteps [N], sigmas float32 [N + 1] ending in 0, training log sigmas float32) as set_timesteps."""
    if schedule.kind != "vp":
        raise ValueError(f"{name} needs a discrete (VP) noise schedule, got a {schedule.kind} schedule")
    check_unsupported(config, UNSUPPORTED, name)
    n = schedule.num_train_timesteps
    if steps > n:
        raise ValueError(f"num_inference_steps={steps} exceeds num_train_timesteps={n}")
    train_sigmas = ve_sigmas(schedule.alphas_cumprod)
    if not np.isfinite(train_sigmas).all():
        raise ValueError(f"{name}: the schedule has zero terminal SNR (infinite sigma_max), which {name} cannot step")
    log_sigmas = np.log(train_sigmas)
    timesteps = discrete_timesteps(config.get("timestep_spacing", "linspace"), n, steps,
                                   int(config.get("steps_offset", 0)))
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    karras = config.get("use_karras_sigmas", False)
    if karras or config.get("use_exponential_sigmas", False):
        bounds = foreign_sigma_range(schedule)
        sigma_min = sigmas[-1].item() if bounds["sigma_min"] is None else bounds["sigma_min"]
        sigma_max = sigmas[0].item() if bounds["sigma_max"] is None else bounds["sigma_max"]
        sigmas = (karras_sigmas if karras else exponential_sigmas)(sigma_min, sigma_max, steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        timesteps = timesteps.round() if karras else timesteps
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return timesteps, sigmas, torch.from_numpy(log_sigmas)


def midpoint_timesteps(levels: torch.Tensor, log_sigmas: torch.Tensor) -> np.ndarray:
    """Timesteps of the midpoint levels: diffusers' sigma_to_t, one float32 level at a time."""
    return np.array([sigma_to_t(s, log_sigmas) for s in levels]).astype(np.float32)


def log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(lerp(log a, log b, 0.5)) in float32 torch (0 where either is 0)."""
    return a.log().lerp(b.log(), 0.5).exp()


def slope(x0_x: float, x0_m: float, sigma: float, dt: float) -> Combo:
    """dt (x - x0) / sigma in x and m."""
    r = dt / sigma
    return Combo(x=r * (1.0 - x0_x), model=-r * x0_m)


def model_call(ptype: str, level: torch.Tensor, t: float, base: Combo, dt: torch.Tensor, name: str) -> StepRow:
    """The row of a model call at VE level ``level``: base + dt d(x, level)."""
    x0_x, x0_m = x0_coefs(ptype, level, name)
    out = base.plus(slope(x0_x, x0_m, float(level), float(dt)))
    return StepRow(timestep=float(t), c_in=input_scale(level), x0_x=x0_x, x0_model=x0_m, out=out)


def two_stage_rows(ptype: str, timesteps: np.ndarray, sigmas: torch.Tensor, mids: torch.Tensor,
                   mid_timesteps: np.ndarray, targets: torch.Tensor, noise: torch.Tensor | None, name: str) -> list:
    """Rows of both schedulers: step k runs s_k -> mids[k] (slot 0 keeps x), then mids[k] -> targets[k]
    from slot 0 (plus noise[k] z when ``noise`` is given); the last step is its first call alone."""
    rows = []
    for k in range(len(timesteps)):
        first = model_call(ptype, sigmas[k], timesteps[k], Combo(x=1.0), mids[k] - sigmas[k], name)
        rows.append(first)
        if k == len(timesteps) - 1:
            break
        first.writes = [(0, Combo(x=1.0))]
        second = model_call(ptype, mids[k], mid_timesteps[k], Combo(hist={0: 1.0}), targets[k] - sigmas[k], name)
        if noise is not None:
            second.out.noise, second.noise = float(noise[k]), True
        rows.append(second)
    return rows


def check_prediction_type(ptype: str, name: str) -> None:
    if ptype not in ("epsilon", "v_prediction"):
        raise NotImplementedError(f"{name}: prediction_type={ptype!r} is not reproduced (epsilon, v_prediction; "
                                  "diffusers has not implemented it either)")


def finish(solver: str, rows: list, sigmas: torch.Tensor, config: dict, name: str) -> SolverPlan:
    """The plan, after refusing a first timestep that repeats (diffusers would start at its second match)."""
    check_first_timestep(np.array([r.timestep for r in rows]), name)
    return SolverPlan(solver, rows, n_slots=1 if len(rows) > 1 else 0,
                      init_noise_sigma=init_noise_sigma(sigmas, config.get("timestep_spacing", "linspace")))


@register("KDPM2DiscreteScheduler", OPTIONS, presets={"kdpm2": {}})
def build_kdpm2(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' KDPM2DiscreteScheduler: 2N - 1 model calls (no step options)."""
    name = "KDPM2DiscreteScheduler"
    check_step_options(step_options, (), name)
    check_prediction_type(schedule.prediction_type, name)
    timesteps, sigmas, log_sigmas = k_grid(schedule, config, steps, name)
    mids = log_midpoint(sigmas, sigmas.roll(1))[1:]  # mids[k] between s_k and s_{k+1}; mids[N-1] = 0
    rows = two_stage_rows(schedule.prediction_type, timesteps, sigmas, mids, midpoint_timesteps(mids[:-1], log_sigmas),
                          sigmas[1:], None, name)
    return finish("kdpm2", rows, sigmas, config, name)


@register("KDPM2AncestralDiscreteScheduler", OPTIONS, presets={"kdpm2-ancestral": {}})
def build_kdpm2_ancestral(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' KDPM2AncestralDiscreteScheduler: 2N - 1 model calls, N - 1 noise draws."""
    name = "KDPM2AncestralDiscreteScheduler"
    check_step_options(step_options, (), name)
    check_prediction_type(schedule.prediction_type, name)
    timesteps, sigmas, log_sigmas = k_grid(schedule, config, steps, name)
    sigmas_next = sigmas.roll(-1)
    sigmas_next[-1] = 0.0
    sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
    sigmas_down = (sigmas_next**2 - sigmas_up**2) ** 0.5
    sigmas_down[-1] = 0.0
    mids = log_midpoint(sigmas, sigmas_down)
    mids[-2:] = 0.0
    rows = two_stage_rows(schedule.prediction_type, timesteps, sigmas, mids, midpoint_timesteps(mids[:-2], log_sigmas),
                          sigmas_down, sigmas_up, name)
    return finish("kdpm2-ancestral", rows, sigmas, config, name)
