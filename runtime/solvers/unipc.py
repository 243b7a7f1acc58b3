"""UniPC (Zhao et al. 2023): UniP predictor + UniC corrector, as diffusers' UniPCMultistepScheduler.

Noise levels are VE sigmas s_i with alpha_i = 1/sqrt(s_i^2 + 1), sigma_i = s_i alpha_i,
lambda_i = log alpha_i - log sigma_i. The model output at step i is converted (from the
*uncorrected* sample x_i the model saw) to M_i: the data prediction x0 (predict_x0, default) or
the noise prediction eps. A B(h) update from s0 to t with order p, h = lambda_t - lambda_s0,
hh = -h (predict_x0) or h, B(h) = hh (bh1) or e^hh - 1 (bh2), r_k = (lambda_{s_k} - lambda_s0)/h:

    predict_x0:  x_t = sigma_t/sigma_s0 x - alpha_t (e^hh - 1) M_s0 - alpha_t B(h) R
    eps:         x_t = alpha_t/alpha_s0 x - sigma_t (e^hh - 1) M_s0 - sigma_t B(h) R

    UniP (predictor, step i: s0 = s_i, t = s_{i+1}, x = x_c):
        R = sum_{k=1}^{p-1} rho^p_k (M_{i-k} - M_i)/r_k
    UniC (corrector at step i: s0 = s_{i-1}, t = s_i, x = the previous corrected sample L_{i-1}):
        R = sum_{k=1}^{p-1} rho^c_k (M_{i-1-k} - M_{i-1})/r_k + rho^c_p (M_i - M_{i-1})

rho solves the Vandermonde system sum_k r_k^(j-1) rho_k = b_j (r_p = 1), j = 1..p, with
b_j = j! hphi_{j+1} / B(h) with hphi_1 = e^hh - 1, hphi_2 = hphi_1/hh - 1,
hphi_{j+1} = hphi_j/hh - 1/j!: the corrector uses the full p x p system (p = 1: rho = 1/2), the
predictor the leading (p-1) x (p-1) block (p = 2: rho = 1/2). The scalars are computed as
diffusers computes them (0-dim float32 torch), the systems are solved in float64 on the host.

Step i: the corrector (on unless i = 0 or i - 1 in disable_corrector) uses the order of step
i - 1; the predictor's order is min(solver_order, i + 1) (warm-up), also <= N - i with
lower_order_final (for any N, unlike DPM-Solver). Everything is linear, so one table row holds
both: out = UniP(x_c = UniC(L_{i-1}, M_{i-1..}, x0 = M_i)), and the row writes M_i and
L_i = x_c to history (M_j in ring slot j % K, K the largest lag read; L in slot K).

Flow sigmas (use_flow_sigmas=True with prediction_type="flow_prediction", Wan 2.1/2.2's config): the levels s_i are
flow sigmas, x = (1 - s) x0 + s eps, so alpha_i = 1 - s_i, sigma_i = s_i (lambda as above) and the model's velocity m
gives M = x0 = x - s m (predict_x0; diffusers has no noise-prediction form for flow). Grid, as set_timesteps:
u = linspace(1, 1/T, N + 1)[:-1] (float64; or the custom ``sigmas``), s = flow_shift u / (1 + (flow_shift - 1) u)
(use_dynamic_shifting: s = e^mu / (e^mu + 1/u - 1), linear: mu / (mu + 1/u - 1)), then the shift_terminal
stretch; a first level within 1e-6 of 1 is lowered by 1e-6 (alpha > 0); the model timesteps are int64(s T)
(truncated); the final level is 0 or (sigma_min) the last s again (h = 0: the last step returns its corrected
sample). Karras sigmas on flow sigmas are refused.

Precision: predict_x0=False with a "sample" or "v_prediction" model is ill-conditioned in fp32
(eps = (x - alpha m)/sigma at small sigma; alpha_t/alpha_s0 x - sigma_t (e^h - 1) eps cancels at
large sigma): diffusers' own fp32 steps are up to ~1e-3 off its fp64 run and ours, one fused
combination per step, up to ~3.5x that, so parity there is ~1e-4 rather than 1e-5 (a warning is
logged). Everything else matches diffusers to ~1e-6.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import VP_OPTIONS, register
from .common import check_first_timestep, check_step_options, check_unsupported, noise_prediction, vp_schedule
from .flow import check_flow_schedule, shifted, time_shift
from .multistep import alpha_sigma_lambda
from .plan import Combo, SolverPlan, StepRow
from .sigmas import data_prediction, karras_sigmas, multistep_timesteps, sigma_to_t, ve_sigmas, zero_snr_alphas_cumprod

logger = logging.getLogger(__name__)
NAME = "UniPCMultistepScheduler"
UNSUPPORTED = {"thresholding": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "solver_p": None}
FLOW_STEP_OPTIONS = ("sigmas", "mu")  # set_timesteps' arguments (the flow grid's); ``begin`` is diffrt's (img2img)
OPTIONS = VP_OPTIONS + ("solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "predict_x0", "solver_type", "lower_order_final", "disable_corrector", "solver_p",
                        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                        "flow_shift", "timestep_spacing", "steps_offset", "final_sigmas_type",
                        "rescale_betas_zero_snr", "use_dynamic_shifting", "time_shift_type", "sigma_min",
                        "sigma_max", "shift_terminal")


Form = dict  # linear form: {"x": w, ("M", j): w, ("L", j): w}; M_j model output j, L_j corrected sample j


def unipc_grid(alphas_cumprod: torch.Tensor, config: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], VE sigmas float32 [N + 1]) as UniPCMultistepScheduler.set_timesteps.

    Karras: timesteps round(sigma_to_t(karras sigmas)) (config sigma_min / sigma_max override the
    training range), final level the last Karras sigma or 0; otherwise sigmas interpolated at the
    spaced timesteps, final level the training sigma_min or 0.
    """
    n_train = alphas_cumprod.shape[0]
    timesteps = multistep_timesteps(config.get("timestep_spacing", "linspace"), n_train, steps,
                                    int(config.get("steps_offset", 0)))
    final = config.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise NotImplementedError(f"{NAME}: final_sigmas_type={final!r} is not reproduced (zero, sigma_min)")
    sigmas = ve_sigmas(alphas_cumprod)
    if config.get("use_karras_sigmas", False):
        lo = config.get("sigma_min")
        hi = config.get("sigma_max")
        grid = karras_sigmas(sigmas[0].item() if lo is None else lo, sigmas[-1].item() if hi is None else hi, steps)
        log_sigmas = np.log(sigmas)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in grid]).round().astype(np.int64)
        last = grid[-1] if final == "sigma_min" else 0.0
        return timesteps, np.concatenate([grid, [last]]).astype(np.float32)
    grid = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    last = (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item() if final == "sigma_min" else 0.0
    return timesteps, np.concatenate([grid, [last]]).astype(np.float32)


def flow_grid(config: dict, steps: int, sigmas=None, mu=None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], flow sigmas float32 [N + 1]) as UniPCMultistepScheduler.set_timesteps with
    use_flow_sigmas (module docstring), in diffusers' precision: float64 for the default grid, the custom
    ``sigmas``' own dtype otherwise."""
    n_train = int(config.get("num_train_timesteps", 1000))
    final = config.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise NotImplementedError(f"{NAME}: final_sigmas_type={final!r} is not reproduced (zero, sigma_min)")
    if sigmas is None:
        grid = np.linspace(1, 1 / n_train, steps + 1)[:-1]
    else:
        grid = np.asarray(sigmas)
        if grid.ndim != 1 or len(grid) != steps:
            raise ValueError(f"{NAME}: sigmas must be {steps} values (num_inference_steps), got shape {grid.shape}")
    if config.get("use_dynamic_shifting", False):
        grid = time_shift(mu, grid, config.get("time_shift_type", "exponential"))
    else:
        grid = shifted(grid, config.get("flow_shift", 1.0))
    terminal = config.get("shift_terminal")
    if terminal:
        one_minus = 1 - grid
        with np.errstate(divide="ignore", invalid="ignore"):
            grid = 1 - (one_minus / (one_minus[-1] / (1 - terminal)))
    if not np.isfinite(grid).all():  # e.g. shift_terminal on a grid that ends at 1 (one step): 0 / 0 there
        raise ValueError(f"{NAME}: the flow sigmas are not finite ({np.asarray(grid).tolist()[:8]}), as in diffusers' "
                         "set_timesteps")
    grid = np.array(grid, copy=True)  # never the caller's array
    if np.fabs(grid[0] - 1) < 1e-6:  # diffusers: keeps log(alpha) finite at the first level
        grid[0] -= 1e-6
    timesteps = torch.from_numpy((grid * n_train).copy()).to(torch.int64).numpy()
    last = grid[-1] if final == "sigma_min" else 0
    return timesteps, np.concatenate([grid, [last]]).astype(np.float32)


def flow_alpha_sigma_lambda(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, lambda) of flow level ``s`` (0-dim float32): 1 - s, s, log alpha - log sigma (diffusers' order)."""
    alpha, sigma = 1 - s, s
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def unipc_orders(n: int, solver_order: int, lower_order_final: bool) -> list[int]:
    """Predictor order of each of ``n`` steps: min(solver_order, i + 1[, n - i with lower_order_final]).

    Orders above 3 are refused: expanded into one weight per stored output, the order-4 differences
    lose more fp32 precision than diffusers' (measured 1.8e-5 vs diffusers, 3x its own fp32 error).
    """
    if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
        raise ValueError(f"{NAME}: solver_order must be a positive int, got {solver_order!r}")
    if solver_order > 3:
        raise NotImplementedError(f"{NAME}: solver_order={solver_order} is not reproduced to 1e-5 (1, 2, 3)")
    return [min(solver_order, n - i if lower_order_final else solver_order, min(i, solver_order) + 1)
            for i in range(n)]


def bh_update(levels: list[torch.Tensor], order: int, predict_x0: bool, bh1: bool, corrector: bool,
              to_alpha_sigma=alpha_sigma_lambda) -> tuple[float, float, float, list[float], list[float]]:
    """(x weight, M_s0 weight, weight of R, [r_1..r_{p-1}], [rho_1..]) of one B(h) update.

    ``levels`` = [s_t, s_s0, s_s1, ...] (float32 0-dim; VE sigmas, or flow sigmas with ``to_alpha_sigma`` =
    :func:`flow_alpha_sigma_lambda`); rho has p entries for the corrector and p - 1 for the predictor. Scalars
    follow diffusers' float32 expressions; rho is solved in float64.
    """
    (alpha_t, sigma_t, lam_t), (alpha_s0, sigma_s0, lam_s0) = [to_alpha_sigma(s) for s in levels[:2]]
    h = lam_t - lam_s0
    rks = [(to_alpha_sigma(s)[2] - lam_s0) / h for s in levels[2:order + 1]]
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if bh1 else torch.expm1(hh)
    factorial_i, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    if predict_x0:
        x_w, m0_w, res_w = sigma_t / sigma_s0, -(alpha_t * h_phi_1), -(alpha_t * b_h)
    else:
        x_w, m0_w, res_w = alpha_t / alpha_s0, -(sigma_t * h_phi_1), -(sigma_t * b_h)
    r = [rk.item() for rk in rks]
    size = order if corrector else order - 1
    if (corrector and order == 1) or (not corrector and order == 2):
        rhos = [0.5]
    elif size == 0:
        rhos = []
    else:
        nodes = np.array(r + [1.0], dtype=np.float64)[:size]
        vander = np.stack([nodes**j for j in range(size)])
        rhos = np.linalg.solve(vander, np.array([v.item() for v in b[:size]], dtype=np.float64)).tolist()
    return x_w.item(), m0_w.item(), res_w.item(), r, rhos


def _add(form: Form, key, weight: float) -> None:
    form[key] = form.get(key, 0.0) + weight


def _update_form(x_form: Form, s0: int, order: int, coefs, corrector: bool) -> Form:
    """Linear form of a B(h) update from step s0 applied to ``x_form`` (see the module docstring)."""
    x_w, m0_w, res_w, r, rhos = coefs
    form: Form = {}
    for key, w in x_form.items():
        _add(form, key, x_w * w)
    _add(form, ("M", s0), m0_w)
    for k in range(1, order):  # rho_k (M_{s0-k} - M_s0) / r_k
        w = res_w * rhos[k - 1] / r[k - 1]
        _add(form, ("M", s0 - k), w)
        _add(form, ("M", s0), -w)
    if corrector:  # rho_p (M_{s0+1} - M_s0)
        _add(form, ("M", s0 + 1), res_w * rhos[-1])
        _add(form, ("M", s0), -res_w * rhos[-1])
    return form


def _check_finite_config(orders: list[int], final_zero: bool, predict_x0: bool, bh1: bool) -> None:
    """Refuse what diffusers itself turns into NaN at the last step (sigma_t = 0 makes h infinite)."""
    if not final_zero:
        return
    if bh1:
        problem = "solver_type='bh1' (B(h) = h is infinite, times a zero residual)"
    elif not predict_x0:
        problem = "predict_x0=False (sigma_t * (e^h - 1) is 0 * inf)"
    elif orders[-1] > 1:
        problem = f"a final step of order {orders[-1]} (lower_order_final=False: r_k = 0)"
    else:
        return
    raise ValueError(f"{NAME}: final_sigmas_type='zero' with {problem} gives NaN in diffusers' last step; "
                     "use final_sigmas_type='sigma_min'")


def _check_finite_rows(rows: list[StepRow], orders: list[int]) -> None:
    """Refuse a plan with a non-finite weight (Karras + sigma_min repeats the last sigma: h = 0 at the last
    step, and diffusers' order >= 3 solve there is NaN)."""
    for i, row in enumerate(rows):
        combos = [row.out] + [c for _, c in row.writes]
        weights = [row.x0_x, row.x0_model] + [w for c in combos for w in (c.x, c.x0, *c.hist.values())]
        if not np.isfinite(weights).all():
            raise ValueError(f"{NAME}: step {i} (order {orders[i]}) has non-finite coefficients, as diffusers' "
                             "step does (h = 0 or infinite); set lower_order_final=True or change final_sigmas_type")


def _conversion(ptype: str, predict_x0: bool, level: torch.Tensor) -> tuple[float, float]:
    """(x weight, model weight) of M: data prediction (predict_x0) or noise prediction; flow: x0 = x - s m."""
    if ptype == "flow_prediction":
        return data_prediction("flow", 1.0 - level.item(), level.item())
    if ptype not in ("epsilon", "v_prediction", "sample"):
        raise NotImplementedError(f"{NAME}: prediction_type={ptype!r} is not reproduced (epsilon, v_prediction, sample)")
    alpha, sigma, _ = alpha_sigma_lambda(level)
    return (data_prediction if predict_x0 else noise_prediction)(ptype, alpha.item(), sigma.item())


def trajectory_forms(n: int, orders: list[int], corrected: list[bool], coefs) -> tuple[list[Form], list[Form]]:
    """(next-sample form, corrected-sample form) of every step; coefs[i] = (corrector, predictor) terms."""
    outs, corrected_forms = [], []
    for i in range(n):
        x_c: Form = {"x": 1.0}
        if corrected[i]:
            x_c = _update_form({("L", i - 1): 1.0}, i - 1, orders[i - 1], coefs[i][0], corrector=True)
        corrected_forms.append(x_c)
        outs.append(_update_form(x_c, i, orders[i], coefs[i][1], corrector=False))
    return outs, corrected_forms


def forms_to_rows(timesteps: np.ndarray, conversions: list[tuple[float, float]], outs: list[Form],
                  corrected_forms: list[Form]) -> tuple[list[StepRow], int]:
    """StepRows and slot count: M_j lives in slot j % K (K = largest lag read), L_{i-1} in slot K."""
    def history_keys(form: Form, i: int) -> set:
        return {key for key, w in form.items() if w != 0.0 and key != "x" and key != ("M", i)}

    reads = [history_keys(form, i) for i, form in enumerate(outs)]
    read_l = {j for keys in reads for kind, j in keys if kind == "L"}
    for i in read_l:  # row i also writes L_i, from the same history
        reads[i] |= history_keys(corrected_forms[i], i)
    n_m = max((i - j for i, keys in enumerate(reads) for kind, j in keys if kind == "M"), default=0)
    read_m = {j for keys in reads for kind, j in keys if kind == "M"}

    def combo(form: Form, i: int) -> Combo:
        result = Combo()
        for key, w in form.items():
            if w == 0.0:
                continue
            if key == "x":
                result.x += w
            elif key == ("M", i):
                result.x0 += w
            else:
                slot = key[1] % n_m if key[0] == "M" else n_m
                result.hist[slot] = result.hist.get(slot, 0.0) + w
        return result

    rows = []
    for i, (t, (x0_x, x0_model), out) in enumerate(zip(timesteps, conversions, outs)):
        writes = [(i % n_m, Combo(x0=1.0))] if i in read_m else []
        if i in read_l:
            writes.append((n_m, combo(corrected_forms[i], i)))
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_model, out=combo(out, i),
                            writes=writes))
    return rows, n_m + int(bool(read_l))


def _solver_type(config: dict) -> bool:
    """True for bh1; diffusers maps midpoint / heun / logrho to bh2."""
    solver_type = config.get("solver_type", "bh2")
    if solver_type not in ("bh1", "bh2", "midpoint", "heun", "logrho"):
        raise NotImplementedError(f"{NAME}: solver_type={solver_type!r} is not reproduced (bh1, bh2)")
    return solver_type == "bh1"


def _flow_checks(schedule: NoiseSchedule, config: dict, step_options: dict, predict_x0: bool) -> None:
    """Refuse, by name, the flow-sigma combinations not reproduced, and what diffusers' set_timesteps refuses."""
    ptype = config.get("prediction_type", "epsilon")
    if ptype != "flow_prediction":
        raise NotImplementedError(f"{NAME}: use_flow_sigmas=True with prediction_type={ptype!r} is not reproduced "
                                  "(flow_prediction only)")
    if not predict_x0:
        raise NotImplementedError(f"{NAME}: predict_x0=False with prediction_type='flow_prediction' is not reproduced "
                                  "(diffusers' convert_model_output has no noise prediction for flow either)")
    if config.get("use_karras_sigmas", False):
        raise NotImplementedError(f"{NAME}: use_karras_sigmas=True with use_flow_sigmas=True is not reproduced")
    check_flow_schedule(schedule, NAME)
    if config.get("use_dynamic_shifting", False):
        if step_options.get("mu") is None:
            raise ValueError(f"{NAME}: use_dynamic_shifting=True needs mu, as diffusers' set_timesteps does")
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise NotImplementedError(f"{NAME}: time_shift_type={kind!r} is not reproduced (exponential, linear)")


def _vp_checks(config: dict, step_options: dict) -> None:
    """Refuse, by name, the flow options on the VP branch (diffusers: flow_prediction would use VE sigmas as s,
    dynamic shifting would ignore mu; custom sigmas and shift_terminal it refuses itself)."""
    if config.get("prediction_type") == "flow_prediction":
        raise NotImplementedError(f"{NAME}: prediction_type='flow_prediction' without use_flow_sigmas is not reproduced")
    if config.get("use_dynamic_shifting", False):
        raise NotImplementedError(f"{NAME}: use_dynamic_shifting=True without use_flow_sigmas is not reproduced")
    if config.get("shift_terminal") is not None:
        raise ValueError(f"{NAME}: shift_terminal needs use_flow_sigmas=True, as diffusers says")
    if step_options.get("sigmas") is not None:
        raise ValueError(f"{NAME}: custom sigmas need use_flow_sigmas=True, as diffusers' set_timesteps says")


@register(NAME, OPTIONS, presets={"unipc": {"solver_type": "bh2", "solver_order": 2}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' UniPCMultistepScheduler. Step options: set_timesteps' ``sigmas`` and ``mu`` (flow sigmas;
    mu without use_dynamic_shifting is ignored, as there) and ``begin`` (diffrt's): the loop starts at that index
    of the scheduler's timesteps (img2img's ``set_begin_index``), where diffusers' UniPC starts afresh: no
    corrector at the first step (no last sample), the warm-up orders counted from there. The plan's rows are the
    steps from ``begin`` on."""
    check_unsupported(config, UNSUPPORTED, NAME)
    check_step_options(step_options, ("begin", *FLOW_STEP_OPTIONS), NAME)
    begin = int(step_options.get("begin", 0))
    bh1 = _solver_type(config)
    predict_x0 = bool(config.get("predict_x0", True))
    flow = bool(config.get("use_flow_sigmas", False))
    if flow:
        _flow_checks(schedule, config, step_options, predict_x0)
        ptype, to_alpha_sigma = "flow_prediction", flow_alpha_sigma_lambda
        timesteps, sigmas = flow_grid(config, steps, step_options.get("sigmas"), step_options.get("mu"))
    else:
        _vp_checks(config, step_options)
        ptype, to_alpha_sigma = vp_schedule(schedule, NAME), alpha_sigma_lambda
        if not predict_x0 and ptype != "epsilon":
            logger.warning("%s: predict_x0=False with prediction_type=%r is ill-conditioned in fp32; parity with "
                           "diffusers is ~1e-4 (both are that far from the fp64 trajectory), not 1e-5", NAME, ptype)
        alphas_cumprod = schedule.alphas_cumprod
        if config.get("rescale_betas_zero_snr", schedule.config.get("rescale_betas_zero_snr", False)):
            alphas_cumprod = zero_snr_alphas_cumprod(alphas_cumprod)
        timesteps, sigmas = unipc_grid(alphas_cumprod, config, steps)
    check_first_timestep(timesteps, NAME)
    if not 0 <= begin < len(timesteps):
        raise ValueError(f"{NAME}: begin must index one of the {len(timesteps)} steps, got {begin}")
    # from ``begin`` on, the solver's state restarts: the plan of the remaining grid, with the same orders
    # (lower_order_final counts the steps left, the warm-up the steps done since begin)
    timesteps, sigmas = timesteps[begin:], sigmas[begin:]
    n = len(timesteps)
    orders = unipc_orders(n, config.get("solver_order", 2), bool(config.get("lower_order_final", True)))
    _check_finite_config(orders, float(sigmas[-1]) == 0.0, predict_x0, bh1)
    disabled = {int(k) - begin for k in (config.get("disable_corrector") or [])}
    corrected = [i > 0 and i - 1 not in disabled for i in range(n)]
    levels = torch.from_numpy(sigmas)
    coefs = []
    for i in range(n):
        corr = None
        if corrected[i]:
            q = orders[i - 1]
            corr = bh_update([levels[i], levels[i - 1]] + [levels[i - 1 - k] for k in range(1, q)], q,
                             predict_x0, bh1, corrector=True, to_alpha_sigma=to_alpha_sigma)
        pred = bh_update([levels[i + 1], levels[i]] + [levels[i - k] for k in range(1, orders[i])], orders[i],
                         predict_x0, bh1, corrector=False, to_alpha_sigma=to_alpha_sigma)
        coefs.append((corr, pred))
    outs, corrected_forms = trajectory_forms(n, orders, corrected, coefs)
    conversions = [_conversion(ptype, predict_x0, levels[i]) for i in range(n)]
    rows, n_slots = forms_to_rows(timesteps, conversions, outs, corrected_forms)
    _check_finite_rows(rows, orders)
    return SolverPlan("unipc", rows, n_slots, init_noise_sigma=1.0,
                      options={"solver_type": "bh1" if bh1 else "bh2", "predict_x0": predict_x0, "orders": orders,
                               "corrected": corrected, "flow_sigmas": flow})
