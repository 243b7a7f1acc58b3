"""Trajectory Consistency Distillation sampling (Zheng et al. 2024), as diffusers' TCDScheduler.

Timesteps: LCM's (``lcm.lcm_timesteps``): the distillation grid t_j = j * (T // K) - 1, j = 1..K
(K = original_inference_steps), reversed, then N of them at indices floor(linspace(0, K, N, endpoint=False)).
At step i (t = t_i; t' = t_{i+1}, or 0 after the last step), with gamma = eta (a step option, default 0.3):

    s        = floor((1 - gamma) t')                       (float32, then int64)
    x0, eps  = data and noise predictions at abar_t       (epsilon: x0 = (x - sqrt(1 - abar_t) m) / sqrt(abar_t),
               eps = m; v: x0 = sqrt(abar_t) x - sqrt(1 - abar_t) m, eps = sqrt(abar_t) m + sqrt(1 - abar_t) x;
               sample: x0 = m, eps = (x - sqrt(abar_t) m) / sqrt(1 - abar_t))
    x_s      = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps      (diffusers' pred_noised_sample)
    x'       = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) noise    (gamma > 0, every step but the last)
    x'       = x_s                                                             (gamma = 0, and the last step)

so the last step ends at level abar_0, not at x0. The noise is a fresh Gaussian draw in the sample's dtype.
Each row's ``denoised`` is x_s (what step() returns beside prev_sample, as pred_noised_sample).
The model sees x unscaled (c_in = 1) at the integer timestep t; init_noise_sigma = 1. diffusers' TCD
step never clips nor thresholds x0 and never reads timestep_spacing, steps_offset, timestep_scaling or
set_alpha_to_one: those options change nothing, here as there. Scalars are float32 torch, as diffusers.
"""
from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options
from .lcm import lcm_timesteps
from .plan import Combo, SolverPlan, StepRow
from .registry import STEP_OPTIONS, VP_OPTIONS, register

NAME = "TCDScheduler"
STEP_OPTIONS[NAME] = ("eta",)
OPTIONS = VP_OPTIONS + ("original_inference_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                        "steps_offset", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "timestep_spacing", "timestep_scaling", "rescale_betas_zero_snr")
DEFAULT_ETA = 0.3


def tcd_predictions(ptype: str, abar_t: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    """((x, model) weights of x0, (x, model) weights of eps) at cumulative alpha ``abar_t`` (float32 maths)."""
    sqrt_a, sqrt_b = abar_t.sqrt(), (1 - abar_t).sqrt()
    if ptype == "epsilon":
        if float(abar_t) == 0.0:
            raise ValueError(f"{NAME}: epsilon prediction at zero terminal SNR divides by sqrt(abar_t) = 0 "
                             "(diffusers gives NaN); use v_prediction")
        return (1.0 / float(sqrt_a), -float(sqrt_b) / float(sqrt_a)), (0.0, 1.0)
    if ptype == "v_prediction":
        return (float(sqrt_a), -float(sqrt_b)), (float(sqrt_b), float(sqrt_a))
    if ptype == "sample":
        return (0.0, 1.0), (1.0 / float(sqrt_b), -float(sqrt_a) / float(sqrt_b))
    raise NotImplementedError(f"{NAME}: prediction_type={ptype!r} is not supported (epsilon, v_prediction, sample)")


def noised_level(prev_timestep: int, eta: float) -> int:
    """s = floor((1 - eta) t') as diffusers computes it (an int64 tensor times a float: float32)."""
    return int(torch.floor((1 - eta) * torch.tensor(prev_timestep, dtype=torch.int64)).to(dtype=torch.long))


def tcd_row(ptype: str, abar: torch.Tensor, t: int, prev_t: int, eta: float, last: bool) -> StepRow:
    """The row of one TCD step from timestep t to t' = prev_t."""
    (x0_x, x0_m), (eps_x, eps_m) = tcd_predictions(ptype, abar[t])
    abar_s = abar[noised_level(prev_t, eta)]
    sqrt_a_s, sqrt_b_s = float(abar_s.sqrt()), float((1 - abar_s).sqrt())
    noised = Combo(x=sqrt_b_s * eps_x, x0=sqrt_a_s, model=sqrt_b_s * eps_m)
    draws = eta > 0 and not last
    if not draws:
        return StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_m, out=noised, denoised=noised)
    ratio = abar[prev_t] / abar_s
    out = noised.scaled(float(ratio.sqrt()))
    out.noise = float((1 - ratio).sqrt())
    return StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_m, out=out, noise=True, denoised=noised)


@register(NAME, OPTIONS, presets={"tcd": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' TCDScheduler; step option eta (gamma, default 0.3), as its step()."""
    check_step_options(step_options, STEP_OPTIONS[NAME], NAME)
    eta = float(step_options.get("eta", DEFAULT_ETA))
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{NAME}: eta (gamma) must be in [0, 1], got {eta}")
    if schedule.kind != "vp" or schedule.prediction_type == "flow":
        raise ValueError(f"{NAME} needs a discrete (VP) noise schedule, got a {schedule.kind} schedule")
    abar = schedule.alphas_cumprod
    timesteps = lcm_timesteps(schedule.num_train_timesteps, int(config.get("original_inference_steps", 50)), steps)
    check_first_timestep(timesteps, NAME)
    rows = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        prev_t = 0 if last else int(timesteps[i + 1])
        rows.append(tcd_row(schedule.prediction_type, abar, int(t), prev_t, eta, last))
    return SolverPlan("tcd", rows, n_slots=0, init_noise_sigma=1.0, options={"eta": eta})
