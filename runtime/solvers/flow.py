"""Flow-matching Euler (rectified flow), as diffusers' FlowMatchEulerDiscreteScheduler.

The model predicts the velocity m = eps - x0 of x_s = (1 - s) x0 + s eps, so x0 = x - s m. Grid, as
set_timesteps(N, sigmas=None, mu=None, timesteps=None), with T = num_train_timesteps,
shifted(s) = shift s / (1 + (shift - 1) s) and the training sigmas (1..T) / T, shifted unless
use_dynamic_shifting (sigma_max, sigma_min: their first and last):

    1. base:   u = sigmas (custom, float32), else timesteps / T (custom, float32),
               else linspace(sigma_max T, sigma_min T, N) / T (float64)
    2. shift:  use_dynamic_shifting (mu required):  exponential s = e^mu / (e^mu + (1/u - 1)),
                                                   linear      s = mu / (mu + (1/u - 1));
               otherwise s = shifted(u) (the default grid is thereby shifted twice, as diffusers)
    3. optional: stretched to shift_terminal (1 - (1 - s) (1 - shift_terminal) / (1 - s_N-1)), then
       Karras or exponential sigmas
    4. sigmas to float32; model timestep t_i = custom timesteps (float32) or s_i T; s_N = 0.
       invert_sigmas: s_i <- 1 - s_i, t_i = s_i T (even with custom timesteps), s_N = 1.

mu is the pipeline's resolution-dependent shift (FluxPipeline's calculate_shift from base_shift, max_shift,
base_image_seq_len, max_image_seq_len: the scheduler itself never reads those four options); without
use_dynamic_shifting it is ignored, as diffusers ignores it. Custom sigmas / timesteps must have N values.

Step:  x' = x + (s_next - s) m                                      (deterministic)
       x' = (1 - s_next) (x - s m) + s_next noise                   (stochastic_sampling; noise every step, fp32)

c_in = 1 and init_noise_sigma = 1 (flow pipelines scale neither). The s_churn/s_tmin/s_tmax/s_noise
arguments of diffusers' step() are accepted and, as there, have no effect.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .registry import STEP_OPTIONS, register
from .common import check_first_timestep, check_step_options, check_unsupported
from .euler import CHURN_OPTIONS
from .plan import Combo, SolverPlan, StepRow
from .sigmas import exponential_sigmas, karras_sigmas

NAME = "FlowMatchEulerDiscreteScheduler"
UNSUPPORTED = {"use_beta_sigmas": False}
OPTIONS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
           "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
           "use_beta_sigmas", "time_shift_type", "stochastic_sampling")
GRID_OPTIONS = ("sigmas", "mu", "timesteps")  # the arguments of set_timesteps
STEP_OPTIONS[NAME] = CHURN_OPTIONS + GRID_OPTIONS


def shifted(sigmas, shift: float):
    """shift s / (1 + (shift - 1) s) (numpy or torch, in the input's precision)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu, sigmas: np.ndarray, kind: str) -> np.ndarray:
    """diffusers' time_shift(mu, 1.0, sigmas), in the input's precision (mu kept as given, as there)."""
    with np.errstate(divide="ignore"):
        odds = 1 / sigmas - 1
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    if kind == "linear":
        return mu / (mu + odds)
    raise ValueError(f"{NAME}: time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def check_flow_schedule(schedule: NoiseSchedule, name: str) -> None:
    """Refuse a schedule that is not flow matching with velocity prediction."""
    if schedule.kind != "flow" or schedule.prediction_type != "flow":
        raise ValueError(f"{name} needs a flow-matching denoiser (velocity prediction), got a {schedule.kind} "
                         f"schedule predicting {schedule.prediction_type}")


def check_grid_options(config: dict, steps: int, step_options: dict) -> None:
    """diffusers' checks of set_timesteps' arguments: mu with dynamic shifting, N custom sigmas / timesteps."""
    if config.get("use_dynamic_shifting", False) and step_options.get("mu") is None:
        raise ValueError(f"{NAME}: use_dynamic_shifting=True needs mu (the resolution-dependent shift the pipeline "
                         "computes), as diffusers' set_timesteps does")
    for key in ("sigmas", "timesteps"):
        values = step_options.get(key)
        if values is not None and len(values) != steps:
            raise ValueError(f"{NAME}: {key} has {len(values)} values for num_inference_steps={steps}; "
                             "they must have the same length")


def train_sigma_range(num_train: int, shift: float, dynamic: bool) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the training sigmas (float32), shifted unless ``dynamic``."""
    train = torch.from_numpy(np.linspace(1, num_train, num_train, dtype=np.float32)[::-1].copy()) / num_train
    if not dynamic:
        train = shifted(train, shift)
    return train[0].item(), train[-1].item()


def base_sigmas(num_train: int, shift: float, steps: int, dynamic: bool, sigmas, timesteps) -> np.ndarray:
    """Step 1 of set_timesteps: custom sigmas, custom timesteps / T, or the default linspace grid."""
    if sigmas is not None:
        return np.array(sigmas).astype(np.float32)
    if timesteps is not None:
        return np.array(timesteps).astype(np.float32) / num_train
    sigma_max, sigma_min = train_sigma_range(num_train, shift, dynamic)
    return np.linspace(sigma_max * num_train, sigma_min * num_train, steps) / num_train


def reshaped_sigmas(sigmas: np.ndarray, steps: int, config: dict) -> np.ndarray:
    """Step 3 of set_timesteps: the shift_terminal stretch, then Karras or exponential sigmas."""
    terminal = config.get("shift_terminal")
    if terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    if config.get("use_karras_sigmas", False):
        return karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
    if config.get("use_exponential_sigmas", False):
        return exponential_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
    return sigmas


def flow_sigmas(num_train: int, shift: float, steps: int, config: dict, mu=None, sigmas=None,
                timesteps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(model timesteps float32 [N], sigmas float32 [N+1]) of FlowMatchEulerDiscreteScheduler.set_timesteps."""
    dynamic = bool(config.get("use_dynamic_shifting", False))
    grid = base_sigmas(num_train, shift, steps, dynamic, sigmas, timesteps)
    grid = time_shift(mu, grid, config.get("time_shift_type", "exponential")) if dynamic else shifted(grid, shift)
    grid = torch.from_numpy(np.asarray(reshaped_sigmas(grid, steps, config))).to(torch.float32)
    if config.get("invert_sigmas", False):
        grid = 1.0 - grid
        return grid * num_train, torch.cat([grid, torch.ones(1)])
    if timesteps is not None:
        return torch.from_numpy(np.array(timesteps).astype(np.float32)), torch.cat([grid, torch.zeros(1)])
    return grid * num_train, torch.cat([grid, torch.zeros(1)])


@register(NAME, OPTIONS, presets={"flow-euler": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' FlowMatchEulerDiscreteScheduler; step options: set_timesteps' sigmas, mu, timesteps
    and step()'s (inert) churn options."""
    check_step_options(step_options, STEP_OPTIONS[NAME], NAME)
    check_unsupported(config, UNSUPPORTED, NAME)
    check_flow_schedule(schedule, NAME)
    check_grid_options(config, steps, step_options)
    shift = float(config.get("shift", schedule.shift))
    timesteps, sigmas = flow_sigmas(schedule.num_train_timesteps, shift, steps, config, mu=step_options.get("mu"),
                                    sigmas=step_options.get("sigmas"), timesteps=step_options.get("timesteps"))
    check_first_timestep(timesteps.numpy(), NAME)
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
