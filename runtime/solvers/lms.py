"""Linear multistep (LMS, Karras et al. 2022), as diffusers' LMSDiscreteScheduler.

diffusers' VE parametrisation x = x0 + s eps, sigmas s_0 > ... > s_{N-1} > s_N = 0 and timesteps as
EulerDiscreteScheduler's (linear interpolation of sqrt((1 - abar) / abar) at the spaced timesteps, or
Karras / exponential sigmas with t = sigma_to_t(s)). The model sees x / sqrt(s_i^2 + 1). At step i,
with x0 = X x + M m (epsilon: X = 1, M = -s_i; v: X = 1/(s_i^2+1), M = -s_i/sqrt(s_i^2+1); sample:
X = 0, M = 1) and the slope d_i = (x - x0) / s_i:

    q = min(i + 1, order)                              (``order``: the step option, default 4)
    c_j = integral from s_i to s_{i+1} of prod_{k < q, k != j} (tau - s_{i-k}) / (s_{i-j} - s_{i-k}) dtau
    x' = x + sum_{j < q} c_j d_{i-j}

The Lagrange integrals c_j are computed as diffusers computes them (scipy.integrate.quad of the
float32 integrand) or, without scipy, exactly from the polynomial (numpy, float64). History: the last
order - 1 slopes, d_k in slot k % (order - 1). Exponential sigmas use a sigma_min / sigma_max left in
the scheduler's config by another scheduler (diffusers reads them there); Karras sigmas ignore them.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options
from .euler import init_noise_sigma, input_scale, vp_sigma_grid, x0_coefs
from .plan import Combo, SolverPlan, StepRow
from .registry import STEP_OPTIONS, VP_OPTIONS, register

try:
    from scipy import integrate
except ImportError:  # the Lagrange integrals are then computed exactly (lagrange_basis_exact)
    integrate = None

NAME = "LMSDiscreteScheduler"
OPTIONS = VP_OPTIONS + ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing",
                        "steps_offset")
LMS_STEP_OPTIONS = ("order",)  # diffusers' step() keyword; ``begin`` is diffrt's (img2img)
STEP_OPTIONS[NAME] = LMS_STEP_OPTIONS


def foreign_sigma_range(schedule: NoiseSchedule) -> dict:
    """sigma_min / sigma_max that another scheduler left in the config: diffusers' exponential (and
    KDPM2's Karras) conversion reads them there although they are not the class's options."""
    return {k: schedule.config.get(k) for k in ("sigma_min", "sigma_max")}


def lagrange_basis_quad(sigmas: torch.Tensor, order: int, i: int, j: int) -> float:
    """c_j by scipy.integrate.quad of diffusers' float32 integrand (its get_lms_coefficient)."""
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def lagrange_basis_exact(sigmas: torch.Tensor, order: int, i: int, j: int) -> float:
    """c_j integrated exactly: the Lagrange basis polynomial in float64 numpy."""
    nodes = sigmas.double().numpy()
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-nodes[i - k], 1.0]) / (nodes[i - j] - nodes[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(nodes[i + 1]) - antiderivative(nodes[i]))


def lms_coefficients(sigmas: torch.Tensor, order: int, i: int) -> list[float]:
    """[c_0, ..., c_{order-1}] of step i: weights of d_i, d_{i-1}, ... (quad when scipy is installed)."""
    integrate_basis = lagrange_basis_exact if integrate is None else lagrange_basis_quad
    return [integrate_basis(sigmas, order, i, j) for j in range(order)]


def slope(x0_x: float, x0_m: float, sigma: float) -> Combo:
    """d = (x - x0) / sigma in x and m."""
    return Combo(x=(1.0 - x0_x) / sigma, model=-x0_m / sigma)


def check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"{NAME}: order must be a positive int, got {order!r}")
    return int(order)


@register(NAME, OPTIONS, presets={"lms": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' LMSDiscreteScheduler; step options ``order`` (default 4) and ``begin`` (diffrt's: the
    loop starts at that index of the timesteps, img2img's ``set_begin_index``; diffusers' slope list starts empty
    there, so step i uses the first min(q, i - begin + 1) of its order-q coefficients; the plan's rows are the
    steps from ``begin`` on)."""
    check_step_options(step_options, (*LMS_STEP_OPTIONS, "begin"), NAME)
    order = check_order(step_options.get("order", 4))
    begin = int(step_options.get("begin", 0))
    grid_config = {k: config[k] for k in ("timestep_spacing", "steps_offset", "use_karras_sigmas",
                                          "use_exponential_sigmas", "use_beta_sigmas") if k in config}
    if config.get("use_exponential_sigmas", False):
        grid_config.update(foreign_sigma_range(schedule))
    timesteps, sigmas = vp_sigma_grid(schedule, grid_config, steps, NAME)
    check_first_timestep(timesteps, NAME)
    if not 0 <= begin < len(timesteps):
        raise ValueError(f"{NAME}: begin must index one of the {len(timesteps)} steps, got {begin}")
    ring = max(order - 1, 1)
    rows = []
    for i in range(begin, len(timesteps)):
        t = timesteps[i]
        x0_x, x0_m = x0_coefs(schedule.prediction_type, sigmas[i], NAME)
        d_i = slope(x0_x, x0_m, float(sigmas[i]))
        coefficients = lms_coefficients(sigmas, min(i + 1, order), i)[: i - begin + 1]
        out = Combo(x=1.0).plus(d_i, coefficients[0])
        for j, c in enumerate(coefficients[1:], start=1):
            out = out.plus(Combo(hist={(i - j) % ring: 1.0}), c)
        writes = [(i % ring, d_i)] if order > 1 and i < len(timesteps) - 1 else []
        rows.append(StepRow(timestep=float(t), c_in=input_scale(sigmas[i]), x0_x=x0_x, x0_model=x0_m, out=out,
                            writes=writes))
    n_slots = min(order, len(timesteps)) - 1
    return SolverPlan("lms", rows, n_slots=n_slots,
                      init_noise_sigma=init_noise_sigma(sigmas, config.get("timestep_spacing", "linspace")),
                      options={"order": order})
