"""EDM (Karras et al. 2022) Euler and DPM-Solver++ multistep, as diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler (e.g. Playground v2.5: sigma_data 0.5, exponential sigmas).

No betas: the noise levels come from the config alone (the denoiser's NoiseSchedule is not used).
The sample is x = x0 + s eps; for the N levels s_0 > ... > s_{N-1} and the final level s_N:

    karras:      s_i = (s_max^(1/rho) + ramp_i (s_min^(1/rho) - s_max^(1/rho)))^rho,  ramp = linspace(0, 1, N)
                 (ramp and maths in float64 for Euler, float32 for DPM; then float32.
                 diffusers' Euler uses float32 where MPS is available: not reproduced)
    exponential: s_i = exp(linspace(log s_min, log s_max, N))[N-1-i]  (float32; N = 1 gives s_min)
    final s_N:   "zero": 0; "sigma_min": s_{N-1} (Euler) or the config's sigma_min (DPM)

Preconditioning at level s (sd = sigma_data; float32, diffusers' float order):

    model timestep c_noise = log(s) / 4,  input scale c_in = 1 / sqrt(s^2 + sd^2),
    x0 = c_skip x + c_out m,  c_skip = sd^2 / (s^2 + sd^2),  c_out = +-s sd / sqrt(s^2 + sd^2)
    (+ for epsilon, - for v_prediction).

    Euler:  x' = x + (s_next - s_hat) (x - x0) / s_hat, x0 at s_hat; with s_churn (step options, as
            EulerDiscreteScheduler): gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= s <= s_tmax,
            s_hat = s (gamma + 1), x_hat = x + s_noise sqrt(s_hat^2 - s^2) z replaces x in the step.
    DPM:    diffusers' DPM-Solver++ with alpha = 1, sigma = s, lambda = -log s, h = lambda_t - lambda_s0
            (r0, r1, D0, D1, D2 as in ``dpm.py``):
            dpmsolver++:     x' = s_t/s_s0 x - (e^-h - 1) D0 + c1 D1 + c2 D2
                             (midpoint c1 = -(e^-h - 1)/2; heun / order 3 c1 = (e^-h - 1)/h + 1;
                              c2 = -((e^-h - 1 + h)/h^2 - 1/2))
            sde-dpmsolver++: x' = s_t/s_s0 e^-h x + (1 - e^-2h) D0 + c1 D1 + s_t sqrt(1 - e^-2h) z
                             (midpoint c1 = (1 - e^-2h)/2; heun c1 = (1 - e^-2h)/(-2h) + 1; no order 3)
            Orders per step as DPMSolverMultistepScheduler (``multistep.multistep_orders``).

init_noise_sigma = sqrt(s_max^2 + 1), diffusers' value. Scalars are float32 torch as diffusers
computes them; the plan combines them in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options, check_unsupported
from .euler import CHURN_OPTIONS, euler_update
from .multistep import Coefficients, dpm_variant, expand_differences, multistep_orders, ring_rows
from .plan import SolverPlan, StepRow
from .registry import STEP_OPTIONS, register

EDM_OPTIONS = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "num_train_timesteps", "prediction_type",
               "rho")
EULER_OPTIONS = EDM_OPTIONS + ("final_sigmas_type",)
DPM_OPTIONS = EDM_OPTIONS + ("solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                             "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                             "final_sigmas_type")
STEP_OPTIONS["EDMEulerScheduler"] = CHURN_OPTIONS
EULER_NAME, DPM_NAME = "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def edm_sigmas(config: dict, steps: int, ramp_dtype: torch.dtype, name: str) -> torch.Tensor:
    """The N float32 noise levels of set_timesteps(N) (karras ramp in ``ramp_dtype``, as the class does)."""
    sigma_min, sigma_max = config.get("sigma_min", 0.002), config.get("sigma_max", 80.0)
    schedule = config.get("sigma_schedule", "karras")
    if schedule == "karras":
        rho = config.get("rho", 7.0)
        ramp = torch.linspace(0, 1, steps, dtype=ramp_dtype)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    elif schedule == "exponential":
        sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps, dtype=torch.float32).exp().flip(0)
    else:
        raise NotImplementedError(f"{name}: sigma_schedule={schedule!r} is not reproduced (karras, exponential)")
    return sigmas.to(torch.float32)


def with_final_sigma(sigmas: torch.Tensor, config: dict, name: str) -> torch.Tensor:
    """The N + 1 levels: the grid, then its final level ("sigma_min": Euler's last grid level, DPM's config value)."""
    final = config.get("final_sigmas_type", "zero")
    if final == "zero":
        last = 0.0
    elif final == "sigma_min":
        last = float(sigmas[-1]) if name == EULER_NAME else config.get("sigma_min", 0.002)
    else:
        raise NotImplementedError(f"{name}: final_sigmas_type={final!r} is not reproduced (zero, sigma_min)")
    return torch.cat([sigmas, torch.tensor([last], dtype=torch.float32)])


def prediction_type(schedule: NoiseSchedule, config: dict, name: str) -> str:
    """The config's prediction type (the schedule's when the config has none); epsilon or v_prediction."""
    ptype = config.get("prediction_type", schedule.prediction_type)
    if ptype not in ("epsilon", "v_prediction"):
        raise NotImplementedError(f"{name}: prediction_type={ptype!r} is not reproduced (epsilon, v_prediction; "
                                  "diffusers' EDM preconditioning has no other)")
    return ptype


def model_inputs(sigma: torch.Tensor, sigma_data: float) -> tuple[float, float]:
    """(c_noise, c_in) at level ``sigma``: the model's timestep and input scale (float32 maths)."""
    c_noise = 0.25 * torch.log(sigma)
    c_in = 1 / ((sigma**2 + sigma_data**2) ** 0.5)
    return float(c_noise), float(c_in)


def output_scales(sigma: torch.Tensor, sigma_data: float, ptype: str) -> tuple[float, float]:
    """(c_skip, c_out) with x0 = c_skip x + c_out m at level ``sigma`` (float32 maths, diffusers' order)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    signed = sigma if ptype == "epsilon" else -sigma
    c_out = signed * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return float(c_skip), float(c_out)


def init_noise_sigma(config: dict) -> float:
    """diffusers' init_noise_sigma of both EDM classes: sqrt(sigma_max^2 + 1)."""
    return (config.get("sigma_max", 80.0) ** 2 + 1) ** 0.5


def checked_timesteps(sigmas: torch.Tensor, name: str) -> np.ndarray:
    """float32 c_noise of the N grid levels, refused where the first one repeats (diffusers skips it)."""
    timesteps = (0.25 * torch.log(sigmas[:-1])).numpy()
    check_first_timestep(timesteps, name)
    return timesteps


@register(EULER_NAME, EULER_OPTIONS, presets={"edm-euler": {}})
def build_edm_euler(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of EDMEulerScheduler; step options s_churn, s_tmin, s_tmax, s_noise (as its step())."""
    check_step_options(step_options, CHURN_OPTIONS, EULER_NAME)
    s_churn = float(step_options.get("s_churn", 0.0))
    s_tmin, s_tmax = float(step_options.get("s_tmin", 0.0)), float(step_options.get("s_tmax", math.inf))
    s_noise = float(step_options.get("s_noise", 1.0))
    ptype = prediction_type(schedule, config, EULER_NAME)
    sigma_data = config.get("sigma_data", 0.5)
    sigmas = with_final_sigma(edm_sigmas(config, steps, torch.float64, EULER_NAME), config, EULER_NAME)
    checked_timesteps(sigmas, EULER_NAME)
    rows = []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        c_skip, c_out = output_scales(sigma_hat, sigma_data, ptype)
        out = euler_update(c_skip, c_out, float(sigma_hat), float(sigma_next - sigma_hat))
        if gamma > 0:  # x_hat = x + churn * z enters linearly wherever x does (the row's x0 omits it)
            out.noise = out.x * s_noise * float((sigma_hat**2 - sigma**2) ** 0.5)
        c_noise, c_in = model_inputs(sigma, sigma_data)
        rows.append(StepRow(timestep=c_noise, c_in=c_in, x0_x=c_skip, x0_model=c_out, out=out, noise=gamma > 0))
    return SolverPlan("edm-euler", rows, n_slots=0, init_noise_sigma=init_noise_sigma(config),
                      options={"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise})


def edm_lambda(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 (diffusers' float order; inf at sigma = 0)."""
    return torch.log(torch.tensor(1.0)) - torch.log(sigma)


def dpm_coefficients(algorithm: str, solver_type: str, order: int, levels: list[torch.Tensor]) -> Coefficients:
    """Weights of x, M_0..M_{order-1} and noise for one step; ``levels`` = [s_t, s_s0, s_s1, s_s2]."""
    sigma_t, sigma_s0 = levels[0], levels[1]
    lam_t, *lam_prev = [edm_lambda(s) for s in levels[:order + 1]]
    h = lam_t - lam_prev[0]
    r = [(lam_prev[k] - lam_prev[k + 1]) / h for k in range(order - 1)]
    midpoint = solver_type == "midpoint" and order == 2
    if algorithm == "dpmsolver++":
        x_w, noise_w = sigma_t / sigma_s0, None
        d_weights = [-(torch.exp(-h) - 1.0),
                     -(0.5 * (torch.exp(-h) - 1.0)) if midpoint else (torch.exp(-h) - 1.0) / h + 1.0,
                     -((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)]
    else:
        x_w, noise_w = sigma_t / sigma_s0 * torch.exp(-h), sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        d_weights = [1 - torch.exp(-2.0 * h),
                     0.5 * (1 - torch.exp(-2.0 * h)) if midpoint else (1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0]
    noise = 0.0 if noise_w is None else noise_w.item()
    return x_w.item(), expand_differences(order, d_weights[:order], r), noise


def dpm_algorithm(config: dict) -> tuple[str, str]:
    """(algorithm_type, solver_type) after diffusers' substitutions (:func:`~.multistep.dpm_variant`)."""
    check_unsupported(config, {"thresholding": False}, DPM_NAME)
    return dpm_variant(config, ALGORITHMS, DPM_NAME)


def dpm_orders(config: dict, n: int, algorithm: str, begin: int = 0) -> list[int]:
    """Order of each step from ``begin`` on (diffusers' rule, the warm-up restarted at ``begin``); sde-dpmsolver++
    has no third-order step (diffusers fails on one)."""
    small = bool(config.get("lower_order_final", True)) and n < 15
    last_first = bool(config.get("euler_at_final", False)) or small or config.get("final_sigmas_type", "zero") == "zero"
    solver_order = config.get("solver_order", 2)
    orders = multistep_orders(n, solver_order, last_first, small, begin)
    if algorithm == "sde-dpmsolver++" and max(orders) == 3:
        raise NotImplementedError(f"{DPM_NAME}: algorithm_type='sde-dpmsolver++' with solver_order={solver_order} "
                                  "takes a third-order step, which diffusers does not implement for it")
    return orders


def check_finite(coefficients: list[Coefficients], orders: list[int], levels: torch.Tensor) -> None:
    """Refuse a step whose weights are not finite: a higher-order last step from sigma_min to sigma_min
    (final_sigmas_type "sigma_min", 15 steps or more) has h ~ 0, and diffusers' own step gives NaN there."""
    for i, (x_w, m_w, noise_w) in enumerate(coefficients):
        if not all(math.isfinite(w) for w in (x_w, noise_w, *m_w)):
            raise ValueError(f"{DPM_NAME}: step {i} (order {orders[i]}) from sigma {float(levels[i]):g} to "
                             f"{float(levels[i + 1]):g} has non-finite weights (diffusers' step gives NaN there); "
                             "with final_sigmas_type='sigma_min' use euler_at_final=True, solver_type='midpoint' "
                             "with solver_order=2, or final_sigmas_type='zero'")


@register(DPM_NAME, DPM_OPTIONS, presets={
    "edm-dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "edm-dpmpp-3m": {"algorithm_type": "dpmsolver++", "solver_order": 3},
    "edm-dpmpp-2m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
})
def build_edm_dpm(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of EDMDPMSolverMultistepScheduler. Step option ``begin`` (diffrt's): as DPM-Solver's (img2img), the
    warm-up restarts at that index of the timesteps; the plan's rows are the steps from there on."""
    check_step_options(step_options, ("begin",), DPM_NAME)
    begin = int(step_options.get("begin", 0))
    algorithm, solver_type = dpm_algorithm(config)
    ptype = prediction_type(schedule, config, DPM_NAME)
    sigma_data = config.get("sigma_data", 0.5)
    levels = with_final_sigma(edm_sigmas(config, steps, torch.float32, DPM_NAME), config, DPM_NAME)
    timesteps = checked_timesteps(levels, DPM_NAME)
    orders = dpm_orders(config, steps, algorithm, begin)
    predictions = [output_scales(levels[i], sigma_data, ptype) for i in range(begin, steps)]
    coefficients = [dpm_coefficients(algorithm, solver_type, order, [levels[i - k] for k in range(-1, order)])
                    for i, order in enumerate(orders, start=begin)]
    check_finite(coefficients, orders, levels[begin:])
    sde = algorithm == "sde-dpmsolver++"
    rows, n_slots = ring_rows(timesteps[begin:], predictions, coefficients, noise=sde)
    for i, row in enumerate(rows, start=begin):
        row.c_in = model_inputs(levels[i], sigma_data)[1]
    return SolverPlan("edm-dpm-solver", rows, n_slots, init_noise_sigma=init_noise_sigma(config),
                      noise_dtype=torch.float32 if sde else None,
                      options={"algorithm_type": algorithm, "solver_type": solver_type, "orders": orders})
