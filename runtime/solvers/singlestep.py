"""DPM-Solver / DPM-Solver++ singlestep (Lu et al. 2022), as diffusers' DPMSolverSinglestepScheduler.

Noise levels are diffusers' VE sigmas s_i with alpha_i = 1/sqrt(s_i^2 + 1), sigma_i = s_i alpha_i,
lambda_i = log alpha_i - log sigma_i (as in ``dpm.py``). One model call per row; row i goes to
t = s_{i+1} with an order k_i from diffusers' ``order_list`` (below). An order-k row finishes a
singlestep block that began k - 1 rows earlier: it starts from the sample x_b saved at the block's
first row (diffusers' ``self.sample``, set on every order-1 row) and uses the converted model outputs
m0 (this row, level s0 = s_i), m1 (row i - 1, level s1), m2 (row i - 2, level s2): the data prediction
x0 for "dpmsolver++" / "sde-dpmsolver++", the noise prediction eps for "dpmsolver".

    order 1:  as DPM-Solver multistep's first order step from s0 to t (``dpm.dpm_coefficients``).
    order 2:  h = lambda_t - lambda_s1, r0 = (lambda_s0 - lambda_s1)/h,
              D0 = m1, D1 = (m0 - m1)/r0;   x' = a x_b + c0 D0 + c1 D1 (+ n z)
    order 3:  h = lambda_t - lambda_s2, r0 = (lambda_s0 - lambda_s2)/h, r1 = (lambda_s1 - lambda_s2)/h,
              D0 = m2, D1_0 = (m1 - m2)/r1, D1_1 = (m0 - m2)/r0,
              D1 = (r0 D1_0 - r1 D1_1)/(r0 - r1), D2 = 2 (D1_1 - D1_0)/(r0 - r1);
              midpoint: x' = a x_b + c0 D0 + c1 D1_1 (+ n z);  heun: x' = a x_b + c0 D0 + c1 D1 + c2 D2 (+ n z)

with, for the block's start level s = s1 (order 2) or s2 (order 3):

    dpmsolver++:     a = sigma_t/sigma_s, c0 = -alpha_t (e^-h - 1), c2 = -alpha_t ((e^-h - 1 + h)/h^2 - 1/2),
                     c1 = -alpha_t (e^-h - 1)/2 (order 2 midpoint) or alpha_t ((e^-h - 1)/h + 1)
    dpmsolver:       a = alpha_t/alpha_s, c0 = -sigma_t (e^h - 1), c2 = -sigma_t ((e^h - 1 - h)/h^2 - 1/2),
                     c1 = -sigma_t (e^h - 1)/2 (order 2 midpoint) or -sigma_t ((e^h - 1)/h - 1)
    sde-dpmsolver++: a = sigma_t/sigma_s e^-h, c0 = alpha_t (1 - e^-2h), n = sigma_t sqrt(1 - e^-2h),
                     c1 = alpha_t (1 - e^-2h)/2 (order 2 midpoint) or alpha_t ((1 - e^-2h)/(-2h) + 1),
                     c2 = alpha_t ((1 - e^-2h - 2h)/(-2h)^2 - 1/2)

z is a fresh Gaussian draw on every row (sde-dpmsolver++ only), in the model output's dtype.

Order list (``get_order_list``, N steps, order K): set_timesteps first turns lower_order_final on when
N % K != 0 or final_sigmas_type is "zero". With lower_order_final: [1..K] repeated, ending with
[1..N % K] when N % K != 0, else with [1..K-1] + [1]; without: [1..K] * (N // K). Then the last order is
1 when final_sigmas_type is "zero"; at row i diffusers uses at most order i + 1 (its model_outputs).
History: slot 0 holds x_b (written on order-1 rows that a later row reads), slots 1..K-1 a ring of
the converted outputs (row i writes slot 1 + i % (K - 1)). Every scalar is a 0-dim float32 torch
tensor computed as diffusers does, then expanded to one float64 weight per stored output.

Grid: round(linspace(0, T - 1 - clip, N + 1))[::-1][:-1] (clip from lambda_min_clipped), sigmas
interpolated in t; or Karras sigmas with t = round(sigma_to_t) / exponential sigmas with t =
int(sigma_to_t); then the final level 0 ("zero") or the training sigma_min ("sigma_min").
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options, check_unsupported, noise_prediction, vp_schedule
from .dpm import dpm_coefficients
from .multistep import Coefficients, alpha_sigma_lambda, dpm_variant
from .plan import Combo, SolverPlan, StepRow
from .registry import VP_OPTIONS, register
from .sigmas import (data_prediction, exponential_sigmas, final_sigma, karras_sigmas, multistep_timesteps, sigma_to_t,
                     ve_sigmas)

NAME = "DPMSolverSinglestepScheduler"
UNSUPPORTED = {"thresholding": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
               "use_dynamic_shifting": False}
OPTIONS = VP_OPTIONS + ("solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "algorithm_type", "solver_type", "lower_order_final", "use_karras_sigmas",
                        "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift",
                        "final_sigmas_type", "lambda_min_clipped", "variance_type", "use_dynamic_shifting",
                        "time_shift_type")
ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
LEARNED_VARIANCE = ("learned", "learned_range")
SAMPLE_SLOT = 0


def singlestep_grid(alphas_cumprod: torch.Tensor, config: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], VE sigmas float32 [N + 1]) as DPMSolverSinglestepScheduler.set_timesteps."""
    n_train = alphas_cumprod.shape[0]
    lambdas = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = torch.searchsorted(torch.flip(lambdas, [0]), float(config.get("lambda_min_clipped", -float("inf"))))
    timesteps = multistep_timesteps("linspace", n_train, steps, 0, n_train - int(clipped))
    sigmas = ve_sigmas(alphas_cumprod)
    if not np.isfinite(sigmas).all():
        raise ValueError(f"{NAME}: the schedule has zero terminal SNR (infinite sigma_max), which this scheduler "
                         "cannot step (it has no rescale_betas_zero_snr option)")
    log_sigmas = np.log(sigmas)
    if config.get("use_karras_sigmas", False):
        sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round().astype(np.int64)
    elif config.get("use_exponential_sigmas", False):
        sigmas = exponential_sigmas(sigmas[0].item(), sigmas[-1].item(), steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigma_last = final_sigma(config, alphas_cumprod, NAME)
    return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


def order_list(steps: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' ``get_order_list`` after set_timesteps' own changes to lower_order_final."""
    if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not 1 <= solver_order <= 3:
        raise ValueError(f"{NAME}: solver_order must be 1, 2 or 3, got {solver_order!r}")
    lower_order_final = lower_order_final or steps % solver_order != 0 or final_zero
    block = list(range(1, solver_order + 1))
    blocks, rest = divmod(steps, solver_order)
    if not lower_order_final:
        orders = block * blocks
    elif rest:
        orders = block * blocks + block[:rest]
    else:
        orders = block * (blocks - 1) + block[:-1] + [1]
    if final_zero:
        orders[-1] = 1
    return orders


def update_weights(algorithm: str, h: torch.Tensor, alpha_t: torch.Tensor,
                   sigma_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c0, c1 of the midpoint order-2 update, c1 otherwise, c2) of a singlestep update over h."""
    if algorithm == "dpmsolver++":
        return (-(alpha_t * (torch.exp(-h) - 1.0)), -(0.5 * (alpha_t * (torch.exp(-h) - 1.0))),
                alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0), -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)))
    if algorithm == "dpmsolver":
        return (-(sigma_t * (torch.exp(h) - 1.0)), -(0.5 * (sigma_t * (torch.exp(h) - 1.0))),
                -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)), -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)))
    return (alpha_t * (1.0 - torch.exp(-2.0 * h)), 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))),
            alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0),
            alpha_t * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5))


def start_weights(algorithm: str, h: torch.Tensor, t: tuple[torch.Tensor, ...],
                  start: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(weight of the block's start sample, noise weight); ``t``, ``start`` = (alpha, sigma) at t / at s."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = t, start
    if algorithm == "dpmsolver++":
        return (sigma_t / sigma_s).item(), 0.0
    if algorithm == "dpmsolver":
        return (alpha_t / alpha_s).item(), 0.0
    return (sigma_t / sigma_s * torch.exp(-h)).item(), (sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))).item()


def singlestep_coefficients(algorithm: str, solver_type: str, order: int, levels: list[torch.Tensor]) -> Coefficients:
    """Weights of x_b, m0..m_{order-1} and noise for one row; ``levels`` = [s_t, s_s0, s_s1, s_s2]."""
    if order == 1:
        return dpm_coefficients(algorithm, solver_type, 1, levels[:2])
    (alpha_t, sigma_t, lam_t), *prev = [alpha_sigma_lambda(s) for s in levels[:order + 1]]
    lam_start = prev[-1][2]
    h = lam_t - lam_start
    r0 = (prev[0][2] - lam_start) / h
    c0, c1_midpoint, c1, c2 = update_weights(algorithm, h, alpha_t, sigma_t)
    start, noise = start_weights(algorithm, h, (alpha_t, sigma_t), prev[-1][:2])
    inv_r0 = (1.0 / r0).item()
    if order == 2:
        d0, d1 = np.array([0.0, 1.0]), inv_r0 * np.array([1.0, -1.0])
        weights = c0.item() * d0 + (c1_midpoint if solver_type == "midpoint" else c1).item() * d1
        return start, [float(w) for w in weights], noise
    r1 = (prev[1][2] - lam_start) / h
    d0 = np.array([0.0, 0.0, 1.0])
    d1_0, d1_1 = (1.0 / r1).item() * np.array([0.0, 1.0, -1.0]), inv_r0 * np.array([1.0, 0.0, -1.0])
    if solver_type == "midpoint":
        weights = c0.item() * d0 + c1.item() * d1_1
    else:
        r0_, r1_, gap = r0.item(), r1.item(), (r0 - r1).item()
        d1 = (r0_ * d1_0 - r1_ * d1_1) / gap
        d2 = 2.0 * (d1_1 - d1_0) / gap
        weights = c0.item() * d0 + c1.item() * d1 + c2.item() * d2
    return start, [float(w) for w in weights], noise


def later_reads(orders: list[int]) -> tuple[list[bool], list[bool]]:
    """Per row: is its converted output read by a later row; is its sample (a block start) read later."""
    output_read, sample_read = [False] * len(orders), [False] * len(orders)
    start = 0
    for j, order in enumerate(orders):
        if order == 1:
            start = j
        else:
            sample_read[start] = True
        for k in range(1, order):
            output_read[j - k] = True
    return output_read, sample_read


def singlestep_rows(timesteps: np.ndarray, predictions: list[tuple[float, float]], orders: list[int],
                    coefficients: list[Coefficients], noise: bool) -> tuple[list[StepRow], int]:
    """StepRows and number of history slots: x_b in slot 0, output of row j in slot 1 + j % (K - 1)."""
    ring = max(orders) - 1
    reads_output, reads_sample = later_reads(orders)
    rows = []
    for i, (t, (m_x, m_model), order, (start_w, m_w, noise_w)) in enumerate(
            zip(timesteps, predictions, orders, coefficients)):
        out = Combo(x0=m_w[0], noise=noise_w)
        if order == 1:
            out.x = start_w
        else:
            out.hist[SAMPLE_SLOT] = start_w
            for k, w in enumerate(m_w[1:], start=1):
                out.hist[1 + (i - k) % ring] = w
        writes = [(SAMPLE_SLOT, Combo(x=1.0))] if reads_sample[i] else []
        if reads_output[i]:
            writes.append((1 + i % ring, Combo(x0=1.0)))
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=m_x, x0_model=m_model, out=out, writes=writes,
                            noise=noise))
    return rows, 1 + ring if ring else 0


def _algorithm_options(config: dict) -> tuple[str, str]:
    """(algorithm_type, solver_type) after diffusers' own substitutions (deis -> dpmsolver++, ...)."""
    requested = config.get("algorithm_type", "dpmsolver++")
    if requested not in ("dpmsolver++", "sde-dpmsolver++") and config.get("final_sigmas_type", "zero") == "zero":
        raise ValueError(f"{NAME}: final_sigmas_type='zero' needs a dpmsolver++ algorithm_type, got {requested!r}; "
                         "use final_sigmas_type='sigma_min'")
    return dpm_variant(config, ALGORITHMS, NAME)


def _check_refused(config: dict, step_options: dict) -> None:
    """Raise NotImplementedError naming an option value (or step option) this plan does not reproduce."""
    check_unsupported(config, UNSUPPORTED, NAME)
    if config.get("variance_type") in LEARNED_VARIANCE:
        raise NotImplementedError(f"{NAME}: option variance_type={config['variance_type']!r} is not reproduced by "
                                  "diffrt (give the Denoiser a call that returns the predicted mean only)")
    check_step_options(step_options, ("begin",), NAME)


@register(NAME, OPTIONS, presets={
    "dpmpp-2s": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp-3s": {"algorithm_type": "dpmsolver++", "solver_order": 3},
})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' DPMSolverSinglestepScheduler. Step option ``begin`` (diffrt's): the loop starts at that
    index of the timesteps (img2img's ``set_begin_index``), where diffusers' model outputs are still empty: row i
    uses order min(order_list[i], i - begin + 1) (its ``while model_outputs[-order] is None``), so the first row
    starts a block afresh. The plan's rows are the steps from ``begin`` on."""
    _check_refused(config, step_options)
    begin = int(step_options.get("begin", 0))
    ptype = vp_schedule(schedule, NAME)
    algorithm, solver_type = _algorithm_options(config)
    timesteps, sigmas = singlestep_grid(schedule.alphas_cumprod, config, steps)
    check_first_timestep(timesteps, NAME)
    final_zero = config.get("final_sigmas_type", "zero") == "zero"
    listed = order_list(len(timesteps), config.get("solver_order", 2), bool(config.get("lower_order_final", False)),
                        final_zero)
    if not 0 <= begin < len(timesteps):
        raise ValueError(f"{NAME}: begin must index one of the {len(timesteps)} steps, got {begin}")
    # diffusers: while model_outputs[-order] is None, order -= 1 (its outputs start empty at begin)
    orders = [min(listed[i], i - begin + 1) for i in range(begin, len(timesteps))]
    levels = torch.from_numpy(sigmas)
    predict = data_prediction if algorithm.endswith("++") else noise_prediction
    predictions, coefficients = [], []
    for i, order in enumerate(orders, start=begin):
        alpha, sigma, _ = alpha_sigma_lambda(levels[i])
        predictions.append(predict(ptype, alpha.item(), sigma.item()))
        coefficients.append(singlestep_coefficients(algorithm, solver_type, order,
                                                    [levels[i + 1]] + [levels[i - k] for k in range(order)]))
    sde = algorithm == "sde-dpmsolver++"
    rows, n_slots = singlestep_rows(timesteps[begin:], predictions, orders, coefficients, noise=sde)
    return SolverPlan("dpm-solver-singlestep", rows, n_slots, init_noise_sigma=1.0,
                      options={"algorithm_type": algorithm, "solver_type": solver_type, "orders": orders})
