"""DEIS multistep (Zhang & Chen 2022, log-rho variant), as diffusers' DEISMultistepScheduler.

Noise levels are VE sigmas s_i with alpha_i = 1/sqrt(s_i^2 + 1), sigma_i = s_i alpha_i and
rho_i = sigma_i / alpha_i. The model output is converted to a noise prediction
eps_i = (x - alpha_i x0_i) / sigma_i (x0_i the data prediction). Step i from s0 = s_i to t = s_{i+1}:

    order 1:  x' = alpha_t/alpha_s0 x - sigma_t (e^h - 1) eps_i,   h = lambda_t - lambda_s0
    order 2:  x' = alpha_t (x/alpha_s0 + C1 eps_i + C2 eps_{i-1})
    order 3:  x' = alpha_t (x/alpha_s0 + C1 eps_i + C2 eps_{i-1} + C3 eps_{i-2})

with C_k = F(rho_t; b_k, ...) - F(rho_s0; b_k, ...), the integral over log rho of the Lagrange
basis polynomial through the log rho of the stored steps (L = log):

    order 2: F(t; b, c)    = t (L t - L c - 1) / (L b - L c),  (b, c) = (rho_s0, rho_s1), (rho_s1, rho_s0)
    order 3: F(t; b, c, d) = t (L c (L d - L t + 1) - L d L t + L d + (L t)^2 - 2 L t + 2)
                             / ((L b - L c)(L b - L d)),
             (b, c, d) = (rho_s0, rho_s1, rho_s2), (rho_s1, rho_s2, rho_s0), (rho_s2, rho_s0, rho_s1).

The final level is the training sigma_min (Karras / exponential grids: their last sigma repeated). Order per
step: warm-up (order <= i + 1), and with lower_order_final and < 15 steps the last step is first
order and the one before at most second order. Scalars are computed as diffusers computes them
(0-dim float32 tensors; logs through numpy's float32 log, as ``np.log`` on a tensor does).
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import VP_OPTIONS, register
from .common import check_step_options, check_first_timestep, check_unsupported, vp_schedule
from .multistep import Coefficients, alpha_sigma_lambda, multistep_orders, ring_rows
from .plan import SolverPlan
from .sigmas import data_prediction, exponential_sigmas, karras_sigmas, multistep_timesteps, sigma_to_t, ve_sigmas

NAME = "DEISMultistepScheduler"
UNSUPPORTED = {"thresholding": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
               "use_dynamic_shifting": False, "rescale_betas_zero_snr": False}
OPTIONS = VP_OPTIONS + ("solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "algorithm_type", "solver_type", "lower_order_final", "use_karras_sigmas",
                        "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift",
                        "timestep_spacing", "steps_offset", "use_dynamic_shifting", "time_shift_type")


def deis_grid(alphas_cumprod: torch.Tensor, config: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], VE sigmas float32 [N + 1]) as DEISMultistepScheduler.set_timesteps."""
    n_train = alphas_cumprod.shape[0]
    timesteps = multistep_timesteps(config.get("timestep_spacing", "linspace"), n_train, steps,
                                    int(config.get("steps_offset", 0)))
    sigmas = ve_sigmas(alphas_cumprod)
    log_sigmas = np.log(sigmas)
    karras = config.get("use_karras_sigmas", False)
    if karras or config.get("use_exponential_sigmas", False):
        convert = karras_sigmas if karras else exponential_sigmas
        grid = convert(sigmas[0].item(), sigmas[-1].item(), steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in grid])
        timesteps = (timesteps.round() if karras else timesteps).astype(np.int64)  # exponential: truncated
        return timesteps, np.concatenate([grid, grid[-1:]]).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigma_last = (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item()
    return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


def _log(value: torch.Tensor) -> torch.Tensor:
    """numpy's float32 log of a 0-dim tensor (what ``np.log(tensor)`` computes in diffusers)."""
    return torch.as_tensor(np.log(value.numpy()))


def _basis_integral_2(t, b, c):
    """F(t; b, c) = t (L t - L c - 1) / (L b - L c) (second-order log-rho basis integral)."""
    return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def _basis_integral_3(t, b, c, d):
    """F(t; b, c, d) of the third-order log-rho basis polynomial (see the module docstring)."""
    numerator = t * (_log(c) * (_log(d) - _log(t) + 1) - _log(d) * _log(t) + _log(d) + _log(t) ** 2
                     - 2 * _log(t) + 2)
    denominator = (_log(b) - _log(c)) * (_log(b) - _log(d))
    return numerator / denominator


def deis_coefficients(order: int, levels: list[torch.Tensor]) -> Coefficients:
    """Weights of x and eps_i, eps_{i-1}, ... for one step; ``levels`` = [s_t, s_s0, s_s1, s_s2]."""
    (alpha_t, sigma_t, lam_t), *prev = [alpha_sigma_lambda(s) for s in levels[:order + 1]]
    alpha_s0, _, lam_s0 = prev[0]
    if order == 1:
        h = lam_t - lam_s0
        return (alpha_t / alpha_s0).item(), [-(sigma_t * (torch.exp(h) - 1.0)).item()], 0.0
    rho_t = sigma_t / alpha_t
    rho = [sigma / alpha for alpha, sigma, _ in prev]
    if order == 2:
        (r0, r1) = rho
        coefs = [_basis_integral_2(rho_t, r0, r1) - _basis_integral_2(r0, r0, r1),
                 _basis_integral_2(rho_t, r1, r0) - _basis_integral_2(r0, r1, r0)]
    else:
        (r0, r1, r2) = rho
        coefs = [_basis_integral_3(rho_t, r0, r1, r2) - _basis_integral_3(r0, r0, r1, r2),
                 _basis_integral_3(rho_t, r1, r2, r0) - _basis_integral_3(r0, r1, r2, r0),
                 _basis_integral_3(rho_t, r2, r0, r1) - _basis_integral_3(r0, r2, r0, r1)]
    a_t = alpha_t.item()
    return a_t / alpha_s0.item(), [a_t * c.item() for c in coefs], 0.0


def _eps_prediction(ptype: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(x weight, model weight) of eps = (x - alpha x0) / sigma, x0 the data prediction."""
    x0_x, x0_model = data_prediction(ptype, alpha, sigma)
    return (1.0 - alpha * x0_x) / sigma, -alpha * x0_model / sigma


def _check_algorithm(config: dict) -> None:
    """diffusers maps dpmsolver/dpmsolver++ to deis and midpoint/heun/bh1/bh2 to logrho; others fail."""
    algorithm = config.get("algorithm_type", "deis")
    if algorithm not in ("deis", "dpmsolver", "dpmsolver++"):
        raise NotImplementedError(f"{NAME}: algorithm_type={algorithm!r} is not reproduced (deis)")
    solver_type = config.get("solver_type", "logrho")
    if solver_type not in ("logrho", "midpoint", "heun", "bh1", "bh2"):
        raise NotImplementedError(f"{NAME}: solver_type={solver_type!r} is not reproduced (logrho)")


@register(NAME, OPTIONS, presets={"deis": {"solver_order": 2}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' DEISMultistepScheduler. Step option ``begin``: as DPM-Solver's (img2img)."""
    check_unsupported(config, UNSUPPORTED, NAME)
    check_step_options(step_options, ("begin",), NAME)
    begin = int(step_options.get("begin", 0))
    ptype = vp_schedule(schedule, NAME)
    if float(schedule.alphas_cumprod[-1]) == 0.0:
        raise NotImplementedError(f"{NAME}: the schedule has zero terminal SNR (rescale_betas_zero_snr), which DEIS "
                                  "does not handle (its last sigma is infinite)")
    _check_algorithm(config)
    timesteps, sigmas = deis_grid(schedule.alphas_cumprod, config, steps)
    check_first_timestep(timesteps, NAME)
    n = len(timesteps)
    small = bool(config.get("lower_order_final", True)) and n < 15
    orders = multistep_orders(n, config.get("solver_order", 2), small, small, begin)
    levels = torch.from_numpy(sigmas)
    predictions, coefficients = [], []
    for i, order in enumerate(orders, start=begin):
        alpha, sigma, _ = alpha_sigma_lambda(levels[i])
        predictions.append(_eps_prediction(ptype, alpha.item(), sigma.item()))
        coefficients.append(deis_coefficients(order, [levels[i + 1]] + [levels[i - k] for k in range(order)]))
    rows, n_slots = ring_rows(timesteps[begin:], predictions, coefficients, noise=False)
    return SolverPlan("deis", rows, n_slots, init_noise_sigma=1.0, options={"orders": orders})
