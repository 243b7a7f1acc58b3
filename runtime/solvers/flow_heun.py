"""Flow-matching Heun, as diffusers' FlowMatchHeunDiscreteScheduler.

The model predicts the velocity m = eps - x0 of x_s = (1 - s) x0 + s eps (x0 = x - s m). Grid, as
set_timesteps(N): flow-euler's default grid with the config shift (no dynamic shifting, custom sigmas or
sigma options in this class): s_0 .. s_N-1 (float32), s_N = 0, model timesteps t_i = s_i T. diffusers
repeats every t_i, s_i with i >= 1 for the two stages, so N steps take 2N-1 model calls.

Step k from s = s_k to s_next = s_k+1, with the churn of diffusers' step() (s_churn, s_tmin, s_tmax,
s_noise; 2N = len(diffusers' sigmas)):

    gamma = min(s_churn / (2N - 1), sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0,  s_hat = s (gamma + 1)
    x_hat = x + s_noise sqrt(s_hat^2 - s^2) noise                 (a noise draw only where gamma > 0)
    d1 = s m1 / s_hat,  dt = s_next - s_hat                        (the model ran on x, not x_hat)
    row 2k:    x_mid = x_hat + dt d1                               (x_hat saved in slot 0)
    row 2k+1:  x' = x_hat + dt (d1 + m2) / 2 = 0.5 H0 + 0.5 x_mid + 0.5 dt m2   (m2 at x_mid, t_k+1)

Where gamma > 0 the second stage draws a noise of its own, which diffusers adds to a sample it then
discards: the row consumes the draw with weight 0. The last step (s_next = 0) is its first stage alone.
c_in = 1 and init_noise_sigma = 1.
"""
from __future__ import annotations

import math

import torch

from ..schedule import NoiseSchedule
from .common import check_first_timestep, check_step_options
from .euler import CHURN_OPTIONS
from .flow import check_flow_schedule, flow_sigmas
from .plan import Combo, SolverPlan, StepRow
from .registry import STEP_OPTIONS, register

NAME = "FlowMatchHeunDiscreteScheduler"
OPTIONS = ("num_train_timesteps", "shift")
STEP_OPTIONS[NAME] = CHURN_OPTIONS


def churn_options(step_options: dict) -> dict[str, float]:
    """s_churn, s_tmin, s_tmax, s_noise with diffusers' defaults."""
    return {"s_churn": float(step_options.get("s_churn", 0.0)), "s_tmin": float(step_options.get("s_tmin", 0.0)),
            "s_tmax": float(step_options.get("s_tmax", math.inf)), "s_noise": float(step_options.get("s_noise", 1.0))}


def first_stage(sigma: torch.Tensor, sigma_next: torch.Tensor, churn: dict, n_sigmas: int
                ) -> tuple[float, float, float, bool]:
    """(weight of m1 in x_mid - x_hat, dt, weight of the noise in x_hat, draws noise) of one step (fp32 maths)."""
    gamma = min(churn["s_churn"] / (n_sigmas - 1), 2**0.5 - 1) if churn["s_tmin"] <= sigma <= churn["s_tmax"] else 0.0
    sigma_hat = sigma * (gamma + 1)
    dt = sigma_next - sigma_hat
    noisy = gamma > 0
    noise_weight = churn["s_noise"] * float((sigma_hat**2 - sigma**2) ** 0.5) if noisy else 0.0
    return float(sigma) / float(sigma_hat) * float(dt), float(dt), noise_weight, noisy


@register(NAME, OPTIONS, presets={"flow-heun": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' FlowMatchHeunDiscreteScheduler: 2N-1 rows, one per model call (slot 0 keeps x_hat)."""
    check_step_options(step_options, CHURN_OPTIONS, NAME)
    check_flow_schedule(schedule, NAME)
    churn = churn_options(step_options)
    shift = float(config.get("shift", schedule.shift))
    timesteps, sigmas = flow_sigmas(schedule.num_train_timesteps, shift, steps, {})
    check_first_timestep(timesteps.numpy(), NAME)
    rows = []
    for k in range(steps):
        drift, dt, noise_weight, noisy = first_stage(sigmas[k], sigmas[k + 1], churn, 2 * steps)
        x_hat = Combo(x=1.0, noise=noise_weight)
        last = k == steps - 1
        rows.append(StepRow(timestep=float(timesteps[k]), c_in=1.0, x0_x=1.0, x0_model=-float(sigmas[k]),
                            out=x_hat.plus(Combo(model=drift)), writes=[] if last else [(0, x_hat)], noise=noisy))
        if not last:
            rows.append(StepRow(timestep=float(timesteps[k + 1]), c_in=1.0, x0_x=1.0, x0_model=-float(sigmas[k + 1]),
                                out=Combo(x=0.5, model=0.5 * dt, hist={0: 0.5}), noise=noisy))
    return SolverPlan("flow-heun", rows, n_slots=1, init_noise_sigma=1.0, options=churn)
