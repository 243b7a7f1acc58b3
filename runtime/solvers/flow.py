"""Flow-matching Euler (rectified flow), as diffusers' FlowMatchEulerDiscreteScheduler.

The model predicts the velocity m = eps - x0 of x_s = (1 - s) x0 + s eps, so x0 = x - s m. Grid, as
set_timesteps: with T = num_train_timesteps and the training sigmas already shifted
(sigma_max = shifted(1), sigma_min = shifted(1 / T), shifted(s) = shift s / (1 + (shift - 1) s)),

    s_i = shifted(linspace(sigma_max T, sigma_min T, N) / T)      (shifted a second time, as diffusers)
    optional: stretched to shift_terminal (1 - (1 - s) (1 - shift_terminal) / (1 - s_N-1)), Karras or
    exponential; model timestep t_i = s_i T (float32); s_N = 0.
    invert_sigmas: s_i <- 1 - s_i, t_i = s_i T, s_N = 1.

Step:  x' = x + (s_next - s) m                                      (deterministic)
       x' = (1 - s_next) (x - s m) + s_next noise                   (stochastic_sampling; noise every step, fp32)

c_in = 1 and init_noise_sigma = 1 (flow pipelines scale neither). The s_churn/s_tmin/s_tmax/s_noise
arguments of diffusers' step() are accepted and, as there, have no effect.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import STEP_OPTIONS, register
from .common import check_step_options, check_unsupported
from .euler import CHURN_OPTIONS
from .plan import Combo, SolverPlan, StepRow
from .sigmas import exponential_sigmas, karras_sigmas

UNSUPPORTED = {"use_dynamic_shifting": False, "use_beta_sigmas": False}
OPTIONS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
           "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
           "use_beta_sigmas", "time_shift_type", "stochastic_sampling")
STEP_OPTIONS["FlowMatchEulerDiscreteScheduler"] = CHURN_OPTIONS


def shifted(sigmas, shift: float):
    """shift s / (1 + (shift - 1) s) (numpy or torch, in the input's precision)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_train: int, shift: float, steps: int, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(model timesteps float32 [N], sigmas float32 [N+1]) of FlowMatchEulerDiscreteScheduler.set_timesteps."""
    train = torch.from_numpy(np.linspace(1, num_train, num_train, dtype=np.float32)[::-1].copy()) / num_train
    train = shifted(train, shift)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = shifted(np.linspace(sigma_max * num_train, sigma_min * num_train, steps) / num_train, shift)
    terminal = config.get("shift_terminal")
    if terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    if config.get("use_karras_sigmas", False):
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
    elif config.get("use_exponential_sigmas", False):
        sigmas = exponential_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    if config.get("invert_sigmas", False):
        sigmas = 1.0 - sigmas
        return sigmas * num_train, torch.cat([sigmas, torch.ones(1)])
    return sigmas * num_train, torch.cat([sigmas, torch.zeros(1)])


@register("FlowMatchEulerDiscreteScheduler", OPTIONS, presets={"flow-euler": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' FlowMatchEulerDiscreteScheduler (fixed shift)."""
    name = "FlowMatchEulerDiscreteScheduler"
    check_step_options(step_options, CHURN_OPTIONS, name)
    check_unsupported(config, UNSUPPORTED, name)
    if schedule.kind != "flow" or schedule.prediction_type != "flow":
        raise ValueError(f"{name} needs a flow-matching denoiser (velocity prediction), got a {schedule.kind} "
                         f"schedule predicting {schedule.prediction_type}")
    shift = float(config.get("shift", schedule.shift))
    timesteps, sigmas = flow_sigmas(schedule.num_train_timesteps, shift, steps, config)
    stochastic = bool(config.get("stochastic_sampling", False))
    rows = []
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if stochastic:
            out = Combo(x0=float(1.0 - sigma_next), noise=float(sigma_next))
        else:
            out = Combo(x=1.0, model=float(sigma_next - sigma))
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=1.0, x0_model=-float(sigma), out=out, noise=stochastic))
    return SolverPlan("flow-euler", rows, n_slots=0, init_noise_sigma=1.0,
                      noise_dtype=torch.float32 if stochastic else None)
