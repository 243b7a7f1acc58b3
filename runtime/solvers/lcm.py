"""Latent consistency model sampling (Luo et al. 2023), as diffusers' LCMScheduler.

Timesteps: the distillation grid t_j = j * (T // K) - 1, j = 1..K (K = original_inference_steps), reversed,
then N of them at indices floor(linspace(0, K, N, endpoint=False)). At step i (t = t_i, t' = t_{i+1}):

    x0       = clip(data prediction)          (epsilon: (x - sqrt(1 - abar_t) m) / sqrt(abar_t);
                                               v: sqrt(abar_t) x - sqrt(1 - abar_t) m; sample: m)
    c_skip   = 0.25 / ((s t)^2 + 0.25),  c_out = s t / sqrt((s t)^2 + 0.25)   (s = timestep_scaling)
    denoised = c_out x0 + c_skip x
    x'       = sqrt(abar_t') denoised + sqrt(1 - abar_t') noise     (fresh noise, every step but the last)
    x'       = denoised                                              (last step)

The model sees x unscaled (c_in = 1) at the integer timestep t; init_noise_sigma = 1. Scalars are
computed in float32 torch, as diffusers does.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import VP_OPTIONS, register
from .common import check_step_options, check_unsupported
from .plan import Combo, SolverPlan, StepRow

UNSUPPORTED = {"thresholding": False}
OPTIONS = VP_OPTIONS + ("original_inference_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                        "steps_offset", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "timestep_spacing", "timestep_scaling", "rescale_betas_zero_snr")


def lcm_timesteps(num_train: int, original_steps: int, steps: int) -> np.ndarray:
    """LCM's inference timesteps (descending int64), a subset of its distillation grid."""
    if original_steps > num_train:
        raise ValueError(f"original_inference_steps={original_steps} exceeds num_train_timesteps={num_train}")
    if steps > original_steps:
        raise ValueError(f"num_inference_steps={steps} exceeds original_inference_steps={original_steps}: "
                         "LCM's timesteps are a subset of its distillation grid")
    k = num_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[indices]


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency boundary condition, sigma_data = 0.5 (float32)."""
    scaled = torch.tensor(timestep, dtype=torch.int64) * timestep_scaling
    c_skip = 0.5**2 / (scaled**2 + 0.5**2)
    c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
    return c_skip, c_out


def lcm_x0(ptype: str, abar_t: torch.Tensor) -> tuple[float, float]:
    """(x_coef, model_coef) of LCM's data prediction at cumulative alpha ``abar_t``."""
    sqrt_a, sqrt_b = abar_t.sqrt(), (1 - abar_t).sqrt()
    if ptype == "epsilon":
        if float(abar_t) == 0.0:
            raise ValueError("LCMScheduler: epsilon prediction at zero terminal SNR divides by sqrt(abar_t) = 0 "
                             "(diffusers gives NaN); use v_prediction")
        return 1.0 / float(sqrt_a), -float(sqrt_b) / float(sqrt_a)
    if ptype == "v_prediction":
        return float(sqrt_a), -float(sqrt_b)
    if ptype == "sample":
        return 0.0, 1.0
    raise NotImplementedError(f"LCMScheduler: prediction_type={ptype!r} is not supported")


@register("LCMScheduler", OPTIONS, presets={"lcm": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' LCMScheduler (noise drawn on steps 0..N-2, in the sample's dtype)."""
    name = "LCMScheduler"
    check_step_options(step_options, (), name)
    check_unsupported(config, UNSUPPORTED, name)
    if schedule.kind != "vp":
        raise ValueError(f"{name} needs a discrete (VP) noise schedule, got a {schedule.kind} schedule")
    abar = schedule.alphas_cumprod
    timesteps = lcm_timesteps(schedule.num_train_timesteps, int(config.get("original_inference_steps", 50)), steps)
    scaling = float(config.get("timestep_scaling", 10.0))
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    rows = []
    for i, t in enumerate(timesteps):
        t = int(t)
        last = i == len(timesteps) - 1
        x0_x, x0_m = lcm_x0(schedule.prediction_type, abar[t])
        c_skip, c_out = boundary_scalings(t, scaling)
        denoised = Combo(x=float(c_skip), x0=float(c_out))
        if last:
            out = denoised
        else:
            abar_prev = abar[int(timesteps[i + 1])]
            out = denoised.scaled(float(abar_prev.sqrt()))
            out.noise = float((1 - abar_prev).sqrt())
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_m, out=out, noise=not last, clip=clip,
                            denoised=denoised))
    return SolverPlan("lcm", rows, n_slots=0, init_noise_sigma=1.0)
