"""PNDM and PLMS (Liu et al. 2022), as diffusers' PNDMScheduler (Stable Diffusion 1.5's default).

Every update is diffusers' ``_get_prev_sample`` from a sample s at timestep t to t' (a = abar):

    x' = sqrt(a_t'/a_t) s - (a_t' - a_t) e / (a_t sqrt(1 - a_t') + sqrt(a_t (1 - a_t) a_t'))

where e is a combination of model outputs (v_prediction: e = sqrt(a_t) v + sqrt(1 - a_t) s, with v
the same combination of outputs) and a_t' = abar[0] (or 1 with set_alpha_to_one) for t' < 0.
With r = T // N and ets the stored outputs e_k (newest last):

    PLMS step at t -> t - r, m the current output, p = number of stored outputs before it:
      p = 0: e = m;   p = 1: e = (3 m - e_1) / 2;   p = 2: e = (23 m - 16 e_1 + 5 e_2) / 12;
      p >= 3: e = (55 m - 59 e_1 + 37 e_2 - 9 e_3) / 24     (e_1 the newest stored); m is stored.
    skip_prk_steps=True: the timesteps are T_{N-1}, T_{N-2}, T_{N-2}, T_{N-3}, ..., T_0 (N + 1 model
      calls). Call 0 is a PLMS step with p = 0 that also keeps its sample x_0; call 1 (at T_{N-2}, on
      its result) redoes that step from x_0: t = T_{N-2} + r -> T_{N-2} with e = (m + e_0) / 2, and
      stores nothing; the later calls are PLMS steps.
    skip_prk_steps=False: 3 Runge-Kutta steps (12 calls) at the last 4 grid points, h = r // 2:
      call 4k at t0 (keeps x_s = x and e_k = m):  x' = step(x_s, t0 -> t0 - h, m)
      calls 4k+1, 4k+2 (model at t):              x' = step(x_s, t0 -> t - d, m),  d = 0, h
      call 4k+3 (model at t):                     x' = step(x_s, t0 -> t, (m_0 + 2 m_1 + 2 m_2 + m_3) / 6)
      then PLMS steps (p = 3) from T_{N-4} down; this needs N >= 4, as in diffusers.

History slots: 0..2 hold the last three stored outputs (output k in slot k % 3); PLMS keeps x_0 in
slot 1 (free until output 1 is stored); Runge-Kutta keeps x_s in slot 3 and the running sum
m_0/6 + m_1/3 + m_2/3 in slot 4 (as diffusers accumulates it). The model sees x unscaled at the
integer timestep; init_noise_sigma = 1. Scalars are computed in float32 torch, as diffusers does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .common import check_step_options, vp_schedule
from .plan import Combo, SolverPlan, StepRow
from .registry import VP_OPTIONS, register
from .sigmas import data_prediction

NAME = "PNDMScheduler"
OPTIONS = VP_OPTIONS + ("skip_prk_steps", "set_alpha_to_one", "timestep_spacing", "steps_offset")
ETS_SLOTS = 3
PLMS_SAMPLE_SLOT = 1
PRK_SAMPLE_SLOT, PRK_SUM_SLOT = 3, 4
PRK_STEPS = 3  # Runge-Kutta steps before PLMS (diffusers' pndm_order 4 grid points)
# Adams-Bashforth weights, current output first, by the number of outputs combined.
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def pndm_grid(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """diffusers' ``_timesteps`` of PNDMScheduler.set_timesteps: the N grid points, ascending int64."""
    if steps > num_train:
        raise ValueError(f"num_inference_steps={steps} exceeds num_train_timesteps={num_train}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (num_train // steps)).round().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps))[::-1].astype(np.int64) - 1
    raise NotImplementedError(f"{NAME}: timestep_spacing={spacing!r} is not supported (linspace, leading, trailing)")


def plms_timesteps(grid: np.ndarray, skip_prk: bool) -> np.ndarray:
    """Model timesteps of the PLMS calls (descending): with skip_prk the second-to-last point repeats."""
    if skip_prk:
        return np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
    return grid[:-PRK_STEPS][::-1].copy()


def prk_timesteps(grid: np.ndarray, num_train: int, steps: int) -> np.ndarray:
    """Model timesteps of the 12 Runge-Kutta calls (descending), as diffusers builds them."""
    if len(grid) < PRK_STEPS + 1:
        raise ValueError(f"{NAME}: skip_prk_steps=False needs num_inference_steps >= {PRK_STEPS + 1}, got {steps} "
                         "(diffusers fails on it too)")
    half = num_train // steps // 2
    points = np.array(grid[-(PRK_STEPS + 1):]).repeat(2) + np.tile(np.array([0, half]), PRK_STEPS + 1)
    return points[:-1].repeat(2)[1:-1][::-1].copy()


class Alphas:
    """abar at a timestep (float32, as diffusers indexes it); a negative timestep is the final abar."""

    def __init__(self, alphas_cumprod: torch.Tensor, set_alpha_to_one: bool):
        self.table = alphas_cumprod
        self.final = torch.tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]

    def __call__(self, t: int) -> torch.Tensor:
        if t >= len(self.table):
            raise ValueError(f"{NAME}: the step reads timestep {t}, past the training schedule "
                             f"({len(self.table)} timesteps); diffusers fails on it too")
        return self.table[t] if t >= 0 else self.final


def prev_sample(alphas: Alphas, t: int, prev: int, ptype: str, sample: Combo, output: Combo) -> Combo:
    """diffusers' _get_prev_sample(sample, t, prev, output) for linear combinations sample and output."""
    a_t, a_prev = alphas(t), alphas(prev)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
    if ptype == "v_prediction":
        output = output.scaled(float(a_t**0.5)).plus(sample, float(b_t**0.5))
    return sample.scaled(float(sample_coeff)).plus(output, -float(a_prev - a_t) / float(denom))


class Ets:
    """diffusers' ets (stored model outputs) in history slots: output k in slot k % 3."""

    def __init__(self):
        self.count = 0

    def past(self) -> list[Combo]:
        """The stored outputs diffusers combines with the current one, newest first (at most 3)."""
        return [Combo(hist={k % ETS_SLOTS: 1.0}) for k in range(self.count - 1, max(self.count - ETS_SLOTS, 0) - 1, -1)]

    def push(self) -> tuple[int, Combo]:
        """The write that stores the current model output."""
        slot = self.count % ETS_SLOTS
        self.count += 1
        return slot, Combo(model=1.0)


def multistep_output(past: list[Combo]) -> Combo:
    """The PLMS combination of the current output m and the stored ones (newest first)."""
    weights = PLMS_WEIGHTS[len(past) + 1]
    combo = Combo(model=weights[0])
    for weight, stored in zip(weights[1:], past):
        combo = combo.plus(stored, weight)
    return combo


def model_row(alphas: Alphas, t: int, ptype: str, out: Combo, writes: list) -> StepRow:
    """A row whose model runs at integer timestep t on x; its x0 is the data prediction there."""
    a_t = float(alphas(t))
    x0_x, x0_m = data_prediction(ptype, math.sqrt(a_t), math.sqrt(1 - a_t))
    return StepRow(timestep=float(t), c_in=1.0, x0_x=x0_x, x0_model=x0_m, out=out, writes=writes)


def plms_rows(alphas: Alphas, timesteps: np.ndarray, ratio: int, ptype: str, ets: Ets, first_call: int) -> list:
    """Rows of step_plms for diffusers' calls first_call, first_call + 1, ... (its ``counter``)."""
    rows = []
    for call, t in enumerate(timesteps.tolist(), start=first_call):
        if call == 1:  # the first step again, from the kept sample, with the mean of both outputs
            output = Combo(model=0.5).plus(ets.past()[0], 0.5)
            out = prev_sample(alphas, t + ratio, t, ptype, Combo(hist={PLMS_SAMPLE_SLOT: 1.0}), output)
            rows.append(model_row(alphas, t, ptype, out, []))
            continue
        output = multistep_output(ets.past())
        writes = [ets.push()] + ([(PLMS_SAMPLE_SLOT, Combo(x=1.0))] if call == 0 else [])
        rows.append(model_row(alphas, t, ptype, prev_sample(alphas, t, t - ratio, ptype, Combo(x=1.0), output), writes))
    return rows


def prk_rows(alphas: Alphas, timesteps: np.ndarray, half: int, ptype: str, ets: Ets) -> list:
    """Rows of step_prk: 4 calls per Runge-Kutta step, all updating from the step's start sample."""
    rows = []
    running_sum = Combo(hist={PRK_SUM_SLOT: 1.0})
    for call, t in enumerate(timesteps.tolist()):
        prev = t - (0 if call % 2 else half)
        start_t, phase = int(timesteps[call // 4 * 4]), call % 4
        start = Combo(x=1.0) if phase == 0 else Combo(hist={PRK_SAMPLE_SLOT: 1.0})
        output, writes = Combo(model=1.0), []
        if phase == 0:
            writes = [ets.push(), (PRK_SAMPLE_SLOT, Combo(x=1.0)), (PRK_SUM_SLOT, Combo(model=1 / 6))]
        elif phase < 3:
            writes = [(PRK_SUM_SLOT, running_sum.plus(Combo(model=1 / 3)))]
        else:
            output = running_sum.plus(Combo(model=1 / 6))
        rows.append(model_row(alphas, t, ptype, prev_sample(alphas, start_t, prev, ptype, start, output), writes))
    return rows


def slots_used(rows: list[StepRow]) -> int:
    """Number of history slots the rows read or write."""
    written = {slot for row in rows for slot, _ in row.writes}
    read = {slot for row in rows for combo in [row.out] + [c for _, c in row.writes] for slot in combo.hist}
    slots = written | read
    return max(slots) + 1 if slots else 0


@register(NAME, OPTIONS, presets={"pndm": {}})
def build(schedule: NoiseSchedule, config: dict, steps: int, step_options: dict) -> SolverPlan:
    """Plan of diffusers' PNDMScheduler (PLMS with skip_prk_steps, else Runge-Kutta warm-up).

    Step option ``begin`` (diffrt's, not diffusers'): the loop starts at that index of the scheduler's
    timesteps (img2img slices them; PNDM has no set_begin_index): diffusers' PNDM then starts its multistep
    state afresh there (its counter at 0), and so does the plan (PLMS only)."""
    check_step_options(step_options, ("begin",), NAME)
    ptype = vp_schedule(schedule, NAME)
    if ptype not in ("epsilon", "v_prediction"):
        raise NotImplementedError(f"{NAME}: prediction_type={ptype!r} is not reproduced (epsilon, v_prediction; "
                                  "diffusers refuses it too)")
    if float(schedule.alphas_cumprod.min()) <= 0:
        raise ValueError(f"{NAME}: the schedule has zero terminal SNR (abar = 0), which PNDM cannot step "
                         "(rescale_betas_zero_snr is not one of its options)")
    alphas = Alphas(schedule.alphas_cumprod, bool(config.get("set_alpha_to_one", False)))
    n = schedule.num_train_timesteps
    grid = pndm_grid(config.get("timestep_spacing", "leading"), n, steps, int(config.get("steps_offset", 0)))
    skip_prk = bool(config.get("skip_prk_steps", False))
    begin = int(step_options.get("begin", 0))
    if begin and not skip_prk:
        raise NotImplementedError(f"{NAME}: a loop that starts mid-list (begin={begin}) is reproduced for PLMS "
                                  "(skip_prk_steps=True) only")
    ets, rows = Ets(), []
    if not skip_prk:
        rows = prk_rows(alphas, prk_timesteps(grid, n, steps), n // steps // 2, ptype, ets)
    rows += plms_rows(alphas, plms_timesteps(grid, skip_prk)[begin:], n // steps, ptype, ets, first_call=len(rows))
    rows[-1].writes = []  # nothing reads what the last call would store
    return SolverPlan("pndm", rows, n_slots=slots_used(rows), init_noise_sigma=1.0,
                      options={"skip_prk_steps": skip_prk})
