"""DDIM (Song et al. 2021), as diffusers' DDIMScheduler: eta = 0 (deterministic) and eta > 0.

x0  = clip(data prediction)                      eps = model's noise prediction
x'  = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std * noise,
std = eta * sqrt((1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev)).
The previous timestep is t - T // N whatever the spacing (diffusers' rule).
"""
from __future__ import annotations

import math

import numpy as np

from ..schedule import NoiseSchedule
from .registry import VP_OPTIONS, register
from .common import check_step_options, check_unsupported
from .plan import Combo, SolverPlan, StepRow

UNSUPPORTED = {"thresholding": False}
OPTIONS = VP_OPTIONS + ("clip_sample", "set_alpha_to_one", "steps_offset", "thresholding",
                        "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value", "timestep_spacing",
                        "rescale_betas_zero_snr")


def spaced_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """DDIM/DDPM timestep grid (descending ints) for 'linspace', 'leading' or 'trailing' spacing."""
    if steps > num_train:
        raise ValueError(f"num_inference_steps={steps} exceeds num_train_timesteps={num_train}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train / steps
        return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1
    raise NotImplementedError(f"timestep_spacing={spacing!r} is not supported (linspace, leading, trailing)")


@register("DDIMScheduler", OPTIONS, presets={"ddim": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' DDIMScheduler; step options: eta (default 0), use_clipped_model_output."""
    check_unsupported(config, UNSUPPORTED, "DDIMScheduler")
    check_step_options(step_options, ("eta", "use_clipped_model_output"), "DDIMScheduler")
    eta = float(step_options.get("eta", 0.0))
    use_clipped = bool(step_options.get("use_clipped_model_output", False))
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar = schedule.alphas_cumprod.double().numpy()
    final_abar = 1.0 if config.get("set_alpha_to_one", True) else float(abar[0])
    n = schedule.num_train_timesteps
    timesteps = spaced_timesteps(config.get("timestep_spacing", "leading"), n, steps,
                                 int(config.get("steps_offset", 0)))
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    ptype = schedule.prediction_type
    rows = []
    for t in timesteps:
        t = int(t)
        prev = t - n // steps
        a_t = float(abar[t])
        a_prev = float(abar[prev]) if prev >= 0 else final_abar
        sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
        x0_x, x0_m, eps = _predictions(ptype, sa, sb)
        if use_clipped:  # eps recomputed from the clipped x0
            eps = Combo(x=1 / sb, x0=-sa / sb)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * math.sqrt(variance)
        direction = math.sqrt(max(1 - a_prev - std**2, 0.0))
        out = Combo(x0=math.sqrt(a_prev)).plus(eps, direction)
        if eta > 0:
            out.noise = std
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_m, out=out, noise=eta > 0, clip=clip))
    return SolverPlan("ddim", rows, n_slots=0, init_noise_sigma=1.0, options={"eta": eta})


def _predictions(ptype: str, sa: float, sb: float) -> tuple[float, float, Combo]:
    """(x0_x, x0_model, eps combo) for DDIM's parametrisation x = sa x0 + sb eps."""
    if ptype == "epsilon":
        return 1 / sa, -sb / sa, Combo(model=1.0)
    if ptype == "sample":
        return 0.0, 1.0, Combo(x=1 / sb, model=-sa / sb)
    if ptype == "v_prediction":
        return sa, -sb, Combo(x=sb, model=sa)
    raise NotImplementedError(f"DDIMScheduler: prediction_type={ptype!r} is not supported")
