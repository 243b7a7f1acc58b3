"""Checks and conversions shared by the solver builders."""
from __future__ import annotations

import numpy as np

from ..schedule import NoiseSchedule


def check_unsupported(config: dict, unsupported: dict, scheduler: str) -> None:
    """Raise NotImplementedError naming each option set away from the value we reproduce."""
    for key, ok_value in unsupported.items():
        value = config.get(key, ok_value)
        if value != ok_value and value is not None:
            raise NotImplementedError(f"{scheduler}: option {key}={value!r} is not reproduced by diffrt")


def check_step_options(step_options: dict, allowed: tuple[str, ...], name: str) -> None:
    """Raise NotImplementedError naming step options this builder does not take."""
    extra = sorted(k for k in step_options if k not in allowed)
    if extra:
        raise NotImplementedError(f"{name}: step options {extra} are not reproduced by diffrt")


def check_first_timestep(timesteps: np.ndarray, scheduler: str) -> None:
    """Refuse a grid whose first timestep repeats: diffusers starts at its *second* match, skipping a
    noise level (and multistep schedulers then run off their grid)."""
    if len(timesteps) == 0:
        raise ValueError(f"{scheduler}: the timestep grid is empty")
    grid = np.asarray(timesteps, dtype=np.float32)
    if int((grid == grid[0]).sum()) > 1:
        raise ValueError(f"{scheduler}: the first timestep {float(grid[0]):g} repeats in {_head(grid)}; "
                         "diffusers cannot step this grid (use fewer steps or another timestep_spacing)")


def vp_schedule(schedule: NoiseSchedule, scheduler: str) -> str:
    """The prediction type, after checking that the schedule is a VP one this solver reproduces."""
    if schedule.kind != "vp" or schedule.prediction_type == "flow":
        raise NotImplementedError(f"{scheduler}: flow-matching schedules (use_flow_sigmas, flow_prediction) "
                                  "are not reproduced; use the flow-euler solver")
    return schedule.prediction_type


def noise_prediction(ptype: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(x weight, model weight) of the noise prediction eps for x = alpha x0 + sigma eps."""
    if ptype == "epsilon":
        return 0.0, 1.0
    if ptype == "sample":
        return 1.0 / sigma, -alpha / sigma
    if ptype == "v_prediction":
        return sigma, alpha
    raise NotImplementedError(f"prediction_type={ptype!r} is not supported by this solver")


def _head(values: np.ndarray, count: int = 8) -> str:
    """The first ``count`` values of a long grid, for a message that stays short."""
    items = [f"{v:g}" for v in np.asarray(values).reshape(-1)[:count].tolist()]
    return "[" + ", ".join(items) + (f", ... ({len(values)} in all)]" if len(values) > count else "]")
