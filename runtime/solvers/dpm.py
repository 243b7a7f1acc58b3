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
from . import SCHEDULE_KEYS, register
from .ddim import check_unsupported
from .plan import Combo, SolverPlan, StepRow
from .sigmas import (data_prediction, exponential_sigmas, karras_sigmas, multistep_timesteps, sigma_to_t, ve_sigmas,
                     zero_snr_alphas_cumprod)

UNSUPPORTED = {"thresholding": False, "variance_type": None, "use_beta_sigmas": False, "use_flow_sigmas": False,
               "use_dynamic_shifting": False}
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
# Config options of diffusers' multistep schedulers (an unknown key is refused, not ignored).
MULTISTEP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "solver_order",
                  "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "algorithm_type",
                  "solver_type", "lower_order_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                  "use_flow_sigmas", "flow_shift", "timestep_spacing", "steps_offset", "use_dynamic_shifting",
                  "time_shift_type")
DPM_KEYS = MULTISTEP_KEYS + ("euler_at_final", "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped",
                             "variance_type", "rescale_betas_zero_snr")

Coefficients = tuple[float, list[float], float]  # (x weight, weight of M_0, M_1, ..., noise weight)


# ----------------------------------------------------------------------------- shared multistep parts

def alpha_sigma_lambda(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, lambda) of VE level ``s`` (0-dim float32), in diffusers' float order."""
    alpha = 1 / ((s**2 + 1) ** 0.5)
    sigma = s * alpha
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def multistep_orders(n: int, solver_order: int, last_first_order: bool, second_last_low: bool) -> list[int]:
    """Order used at each of ``n`` steps by diffusers' multistep schedulers.

    ``last_first_order``: the last step is first order; ``second_last_low``: the second-to-last
    step is at most second order. Warm-up: step i uses at most order i + 1.
    """
    if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
        raise ValueError(f"solver_order must be a positive int, got {solver_order!r}")
    orders = []
    for i in range(n):
        done = min(i, solver_order)  # diffusers' lower_order_nums before step i
        if solver_order == 1 or done < 1 or (i == n - 1 and last_first_order):
            orders.append(1)
        elif solver_order == 2 or done < 2 or (i == n - 2 and second_last_low):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def expand_differences(order: int, d_weights: list[torch.Tensor], r: list[torch.Tensor]) -> list[float]:
    """Weights of M_0..M_{order-1} equal to sum_j d_weights[j] * D_j (float64 from float32 scalars)."""
    if order == 1:
        basis = [np.array([1.0])]
    elif order == 2:
        inv_r0 = (1.0 / r[0]).item()
        basis = [np.array([1.0, 0.0]), np.array([inv_r0, -inv_r0])]
    else:
        inv_r0, inv_r1 = (1.0 / r[0]).item(), (1.0 / r[1]).item()
        frac, inv_sum = (r[0] / (r[0] + r[1])).item(), (1.0 / (r[0] + r[1])).item()
        d1_0, d1_1 = np.array([inv_r0, -inv_r0, 0.0]), np.array([0.0, inv_r1, -inv_r1])
        basis = [np.array([1.0, 0.0, 0.0]), d1_0 + frac * (d1_0 - d1_1), inv_sum * (d1_0 - d1_1)]
    total = sum(w.item() * b for w, b in zip(d_weights, basis))
    return [float(v) for v in total]


def ring_rows(timesteps: np.ndarray, predictions: list[tuple[float, float]], steps: list[Coefficients],
              noise: bool) -> tuple[list[StepRow], int]:
    """StepRows of a multistep solver and its number of history slots S.

    predictions[i] = (x weight, model weight) of M at step i; steps[i] = (x weight, [weights of M_0,
    M_1, ...], noise weight). Step i reads M_k (k >= 1) from slot (i - k) % S and stores M_0 in slot
    i % S (not at the last step: nothing reads it).
    """
    n_slots = max(len(w) for _, w, _ in steps) - 1
    rows = []
    for i, (t, (m_x, m_model), (x_w, m_w, noise_w)) in enumerate(zip(timesteps, predictions, steps)):
        hist: dict[int, float] = {}
        for k, w in enumerate(m_w[1:], start=1):
            hist[(i - k) % n_slots] = hist.get((i - k) % n_slots, 0.0) + w
        out = Combo(x=x_w, x0=m_w[0], noise=noise_w, hist=hist)
        writes = [(i % n_slots, Combo(x0=1.0))] if n_slots and i < len(timesteps) - 1 else []
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=m_x, x0_model=m_model, out=out,
                            writes=writes, noise=noise))
    return rows, n_slots


def check_known_options(config: dict, known: tuple[str, ...], scheduler: str) -> None:
    """Refuse config keys that are not options of ``scheduler`` (private ``_`` keys and schedule keys pass)."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known and k not in SCHEDULE_KEYS)
    if unknown:
        raise NotImplementedError(f"{scheduler}: option(s) {', '.join(unknown)} are not options of this scheduler")


def check_first_timestep(timesteps: np.ndarray, scheduler: str) -> None:
    """diffusers starts at the *second* match of a repeated first timestep and then runs off its grid."""
    if len(timesteps) == 0:
        raise ValueError(f"{scheduler}: the timestep grid is empty")
    if int((timesteps == timesteps[0]).sum()) > 1:
        raise ValueError(f"{scheduler}: the first timestep {int(timesteps[0])} repeats in {timesteps.tolist()}; "
                         "diffusers cannot step this grid (use fewer steps or another timestep_spacing)")


def vp_schedule(schedule: NoiseSchedule, scheduler: str) -> str:
    """The prediction type, after checking that the schedule is a VP one this solver reproduces."""
    if schedule.kind != "vp" or schedule.prediction_type == "flow":
        raise NotImplementedError(f"{scheduler}: flow-matching schedules (use_flow_sigmas, flow_prediction) "
                                  "are not reproduced; use the flow-euler solver")
    return schedule.prediction_type


def noise_prediction(ptype: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(x weight, model weight) of the noise prediction eps for x = alpha x0 + sigma eps."""
    if ptype == "epsilon":
        return 0.0, 1.0
    if ptype == "sample":
        return 1.0 / sigma, -alpha / sigma
    if ptype == "v_prediction":
        return sigma, alpha
    raise NotImplementedError(f"prediction_type={ptype!r} is not supported by this solver")


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
    final = config.get("final_sigmas_type", "zero")
    if final == "sigma_min":
        sigma_last = (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item()
    elif final == "zero":
        sigma_last = 0.0
    else:
        raise NotImplementedError(f"DPMSolverMultistepScheduler: final_sigmas_type={final!r} (zero, sigma_min)")
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
    algorithm = config.get("algorithm_type", "dpmsolver++")
    algorithm = "dpmsolver++" if algorithm == "deis" else algorithm
    if algorithm not in ALGORITHMS:
        raise NotImplementedError(f"DPMSolverMultistepScheduler: algorithm_type={algorithm!r} is not reproduced "
                                  f"({', '.join(ALGORITHMS)})")
    solver_type = config.get("solver_type", "midpoint")
    solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
    if solver_type not in ("midpoint", "heun"):
        raise NotImplementedError(f"DPMSolverMultistepScheduler: solver_type={solver_type!r} (midpoint, heun)")
    if algorithm in ("dpmsolver", "sde-dpmsolver") and config.get("final_sigmas_type", "zero") == "zero":
        raise ValueError(f"DPMSolverMultistepScheduler: final_sigmas_type='zero' needs a dpmsolver++ algorithm_type, "
                         f"got {algorithm!r}; use final_sigmas_type='sigma_min'")
    return algorithm, solver_type


@register("DPMSolverMultistepScheduler", presets={
    "dpmpp-1m": {"algorithm_type": "dpmsolver++", "solver_order": 1},
    "dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp-3m": {"algorithm_type": "dpmsolver++", "solver_order": 3},
    "dpmpp-2m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "dpmpp-3m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' DPMSolverMultistepScheduler (no step-time options)."""
    name = "DPMSolverMultistepScheduler"
    check_known_options(config, DPM_KEYS, name)
    check_unsupported(config, UNSUPPORTED, name)
    if step_options:
        raise NotImplementedError(f"{name}: step options {sorted(step_options)} are not reproduced")
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
    orders = multistep_orders(n, solver_order, last_first, small)
    if algorithm == "sde-dpmsolver" and max(orders) == 3:
        raise NotImplementedError(f"{name}: algorithm_type='sde-dpmsolver' has no third-order step "
                                  f"(solver_order={solver_order}); diffusers fails on it too")
    levels = torch.from_numpy(sigmas)
    predict = data_prediction if algorithm.endswith("++") else noise_prediction
    predictions, coefficients = [], []
    for i, order in enumerate(orders):
        alpha, sigma, _ = alpha_sigma_lambda(levels[i])
        predictions.append(predict(ptype, alpha.item(), sigma.item()))
        coefficients.append(dpm_coefficients(algorithm, solver_type, order,
                                             [levels[i + 1]] + [levels[i - k] for k in range(order)]))
    sde = algorithm.startswith("sde")
    rows, n_slots = ring_rows(timesteps, predictions, coefficients, noise=sde)
    return SolverPlan("dpm-solver", rows, n_slots, init_noise_sigma=1.0, noise_dtype=torch.float32 if sde else None,
                      options={"algorithm_type": algorithm, "solver_type": solver_type, "orders": orders})
