"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler.

Noise levels are diffusers' VE sigmas s_i (``sigmas.py``) with alpha_i = 1/sqrt(s_i^2 + 1),
sigma_i = s_i alpha_i, lambda_i = log alpha_i - log sigma_i; step i goes from s_i to t = s_{i+1}
with h = lambda_t - lambda_{s0}, h_0 = lambda_{s0} - lambda_{s1}, h_1 = lambda_{s1} - lambda_{s2},
r0 = h_0/h, r1 = h_1/h. M_k is the converted model output of step i-k: the data prediction x0
for "dpmsolver++" / "sde-dpmsolver++", the noise prediction eps for "dpmsolver" / "sde-dpmsolver".
Differences: D0 = M_0, D1 = (M_0 - M_1)/r0 (order 2); order 3: D1_0 = (M_0 - M_1)/r0,
D1_1 = (M_1 - M_2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1).

    dpmsolver++:     x' = sigma_t/sigma_s0 x - alpha_t (e^-h - 1) D0 + c1 D1 + c2 D2
                     (midpoint c1 = -alpha_t (e^-h - 1)/2; heun and order 3 c1 = alpha_t ((e^-h - 1)/h + 1);
                      c2 = -alpha_t ((e^-h - 1 + h)/h^2 - 1/2))
    sde-dpmsolver++: x' = sigma_t/sigma_s0 e^-h x + alpha_t (1 - e^-2h) D0 + c1 D1 + c2 D2
                          + sigma_t sqrt(1 - e^-2h) z
                     (midpoint c1 = alpha_t (1 - e^-2h)/2; heun / order 3 c1 = alpha_t ((1 - e^-2h)/(-2h) + 1);
                      c2 = alpha_t ((1 - e^-2h - 2h)/(2h)^2 - 1/2))
    dpmsolver:       x' = alpha_t/alpha_s0 x - sigma_t (e^h - 1) D0 + c1 D1 + c2 D2
                     (midpoint c1 = -sigma_t (e^h - 1)/2; heun / order 3 c1 = -sigma_t ((e^h - 1)/h - 1);
                      c2 = -sigma_t ((e^h - 1 - h)/h^2 - 1/2))
    sde-dpmsolver:   x' = alpha_t/alpha_s0 x - 2 sigma_t (e^h - 1) D0 + c1 D1 + sigma_t sqrt(e^2h - 1) z
                     (midpoint c1 = -sigma_t (e^h - 1); heun c1 = -2 sigma_t ((e^h - 1)/h - 1); no order 3)

z is a fresh float32 Gaussian draw every step (SDE variants). Order per step (diffusers' rule):
first order at step 0 and at the last step when euler_at_final, final_sigmas_type "zero", or
lower_order_final with < 15 steps; at most second order at step 1 and (lower_order_final, < 15
steps) at the second-to-last step; otherwise ``solver_order``. Every scalar is computed as
diffusers does (0-dim float32 torch tensors, same expressions); the differences are expanded
into one weight per stored prediction (history slots are a ring: step i writes slot i % S).
Grids: timestep spacing on [0, T - clip) (lambda_min_clipped), or Karras / uniform-log-SNR (Lu) /
exponential sigmas with t = sigma_to_t(sigma) (rounded for Karras and Lu unless the beta schedule
is squaredcos_cap_v2); the last level is 0 ("zero") or the training sigma_min ("sigma_min").
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import VP_OPTIONS, register
from .common import check_step_options, check_first_timestep, check_unsupported, noise_prediction, vp_schedule
from .multistep import dpm_variant, Coefficients, alpha_sigma_lambda, expand_differences, multistep_orders, ring_rows
from .plan import SolverPlan
from .sigmas import (
    data_prediction,
    exponential_sigmas,
    final_sigma,
    karras_sigmas,
    multistep_timesteps,
    sigma_to_t,
    ve_sigmas,
    zero_snr_alphas_cumprod,
)

UNSUPPORTED = {"thresholding": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
               "use_dynamic_shifting": False}
OPTIONS = VP_OPTIONS + ("solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
                        "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                        "flow_shift", "final_sigmas_type", "lambda_min_clipped", "variance_type", "timestep_spacing",
                        "steps_offset", "rescale_betas_zero_snr", "use_dynamic_shifting", "time_shift_type")


LEARNED_VARIANCE = ("learned", "learned_range")  # diffusers then keeps the first 3 output channels; other values
                                                 # (a DDPM config's "fixed_small") change nothing in this scheduler
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")



# ----------------------------------------------------------------------------- DPM-Solver

def dpm_grid(alphas_cumprod: torch.Tensor, config: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], VE sigmas float32 [N + 1]) as DPMSolverMultistepScheduler.set_timesteps."""
    n_train = alphas_cumprod.shape[0]
    lambdas = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = torch.searchsorted(torch.flip(lambdas, [0]), float(config.get("lambda_min_clipped", -float("inf"))))
    timesteps = multistep_timesteps(config.get("timestep_spacing", "linspace"), n_train, steps,
                                    int(config.get("steps_offset", 0)), n_train - int(clipped))
    sigmas = ve_sigmas(alphas_cumprod)
    log_sigmas = np.log(sigmas)
    karras, lu = config.get("use_karras_sigmas", False), config.get("use_lu_lambdas", False)
    if karras or lu or config.get("use_exponential_sigmas", False):
        if karras:
            grid = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), steps)
        elif lu:  # uniform log-SNR: Karras' ramp with rho = 1 on log sigma
            grid = np.exp(karras_sigmas(log_sigmas[0].item(), log_sigmas[-1].item(), steps, rho=1.0))
        else:
            grid = exponential_sigmas(sigmas[0].item(), sigmas[-1].item(), steps)
        t = np.array([sigma_to_t(s, log_sigmas) for s in grid])
        if (karras or lu) and config.get("beta_schedule", "linear") != "squaredcos_cap_v2":
            t = t.round()  # otherwise truncated by the int64 cast
        timesteps, sigmas = t.astype(np.int64), grid
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigma_last = final_sigma(config, alphas_cumprod, "DPMSolverMultistepScheduler")
    return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


def dpm_coefficients(algorithm: str, solver_type: str, order: int, levels: list[torch.Tensor]) -> Coefficients:
    """Weights of x, M_0..M_{order-1} and noise for one step; ``levels`` = [s_t, s_s0, s_s1, s_s2]."""
    (alpha_t, sigma_t, lam_t), *prev = [alpha_sigma_lambda(s) for s in levels[:order + 1]]
    alpha_s0, sigma_s0, lam_s0 = prev[0]
    h = lam_t - lam_s0
    r = [(prev[k][2] - prev[k + 1][2]) / h for k in range(order - 1)]
    c2 = None
    if algorithm == "dpmsolver++":
        x_w, noise_w = sigma_t / sigma_s0, None
        c0 = -(alpha_t * (torch.exp(-h) - 1.0))
        c1 = -(0.5 * (alpha_t * (torch.exp(-h) - 1.0))) if solver_type == "midpoint" and order == 2 \
            else alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        if order == 3:
            c2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif algorithm == "sde-dpmsolver++":
        x_w, noise_w = sigma_t / sigma_s0 * torch.exp(-h), sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        c0 = alpha_t * (1 - torch.exp(-2.0 * h))
        c1 = 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) if solver_type == "midpoint" and order == 2 \
            else alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        if order == 3:
            c2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    elif algorithm == "dpmsolver":
        x_w, noise_w = alpha_t / alpha_s0, None
        c0 = -(sigma_t * (torch.exp(h) - 1.0))
        c1 = -(0.5 * (sigma_t * (torch.exp(h) - 1.0))) if solver_type == "midpoint" and order == 2 \
            else -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        if order == 3:
            c2 = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    else:  # sde-dpmsolver (orders 1 and 2 only)
        x_w, noise_w = alpha_t / alpha_s0, sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        c0 = -(2.0 * (sigma_t * (torch.exp(h) - 1.0)))
        c1 = -(sigma_t * (torch.exp(h) - 1.0)) if solver_type == "midpoint" \
            else -(2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)))
    d_weights = [c0, c1, c2][:order]
    noise = 0.0 if noise_w is None else noise_w.item()
    return x_w.item(), expand_differences(order, d_weights, r), noise


def _algorithm_options(config: dict) -> tuple[str, str]:
    """(algorithm_type, solver_type) after diffusers' own substitutions (deis -> dpmsolver++, ...)."""
    algorithm, solver_type = dpm_variant(config, ALGORITHMS, "DPMSolverMultistepScheduler")
    if algorithm in ("dpmsolver", "sde-dpmsolver") and config.get("final_sigmas_type", "zero") == "zero":
        raise ValueError(f"DPMSolverMultistepScheduler: final_sigmas_type='zero' needs a dpmsolver++ algorithm_type, "
                         f"got {algorithm!r}; use final_sigmas_type='sigma_min'")
    return algorithm, solver_type


@register("DPMSolverMultistepScheduler", OPTIONS, presets={
    "dpmpp-1m": {"algorithm_type": "dpmsolver++", "solver_order": 1},
    "dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp-3m": {"algorithm_type": "dpmsolver++", "solver_order": 3},
    "dpmpp-2m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "dpmpp-3m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' DPMSolverMultistepScheduler. Step option ``begin`` (diffrt's): the loop starts at that
    index of the timesteps (img2img), where diffusers starts the solver's warm-up afresh."""
    name = "DPMSolverMultistepScheduler"
    check_unsupported(config, UNSUPPORTED, name)
    if config.get("variance_type") in LEARNED_VARIANCE:
        raise NotImplementedError(f"{name}: option variance_type={config['variance_type']!r} is not reproduced by diffrt "
                                  "(give the Denoiser a call that returns the predicted mean only)")
    check_step_options(step_options, ("begin",), name)
    begin = int(step_options.get("begin", 0))
    ptype = vp_schedule(schedule, name)
    algorithm, solver_type = _algorithm_options(config)
    solver_order = config.get("solver_order", 2)
    alphas_cumprod = schedule.alphas_cumprod
    if config.get("rescale_betas_zero_snr", schedule.config.get("rescale_betas_zero_snr", False)):
        alphas_cumprod = zero_snr_alphas_cumprod(alphas_cumprod)  # a finite sigma at the zero-SNR timestep
    timesteps, sigmas = dpm_grid(alphas_cumprod, config, steps)
    check_first_timestep(timesteps, name)
    n = len(timesteps)
    small = bool(config.get("lower_order_final", True)) and n < 15
    last_first = bool(config.get("euler_at_final", False)) or small or config.get("final_sigmas_type", "zero") == "zero"
    orders = multistep_orders(n, solver_order, last_first, small, begin)
    if algorithm == "sde-dpmsolver" and max(orders) == 3:
        raise NotImplementedError(f"{name}: algorithm_type='sde-dpmsolver' has no third-order step "
                                  f"(solver_order={solver_order}); diffusers fails on it too")
    levels = torch.from_numpy(sigmas)
    predict = data_prediction if algorithm.endswith("++") else noise_prediction
    predictions, coefficients = [], []
    for i, order in enumerate(orders, start=begin):
        alpha, sigma, _ = alpha_sigma_lambda(levels[i])
        predictions.append(predict(ptype, alpha.item(), sigma.item()))
        coefficients.append(dpm_coefficients(algorithm, solver_type, order,
                                             [levels[i + 1]] + [levels[i - k] for k in range(order)]))
    sde = algorithm.startswith("sde")
    rows, n_slots = ring_rows(timesteps[begin:], predictions, coefficients, noise=sde)
    return SolverPlan("dpm-solver", rows, n_slots, init_noise_sigma=1.0, noise_dtype=torch.float32 if sde else None,
                      options={"algorithm_type": algorithm, "solver_type": solver_type, "orders": orders})
