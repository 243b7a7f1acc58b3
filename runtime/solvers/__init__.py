"""Solver plans for every supported solver, and the map from diffusers scheduler classes.

Each solver module registers a builder ``build(schedule, config, num_inference_steps,
step_options) -> SolverPlan`` for the diffusers scheduler class it reproduces, plus short
preset names for ``Sampler(den, solver=...)``. ``config`` holds that class's options under
diffusers' names (a missing key means the class default); a builder raises
NotImplementedError naming any option it does not reproduce.
"""
from __future__ import annotations

import math
from typing import Any

from ..schedule import NoiseSchedule
from .plan import Combo, SolverPlan, StepRow
from .registry import (OPTIONS, PRESETS, SCHEDULE_KEYS, SCHEDULERS, STEP_OPTIONS, Builder, check_options,
                       check_signature, class_config, register)


def plan_from_scheduler(scheduler: Any, num_inference_steps: int, schedule: NoiseSchedule | None = None,
                        **step_options: Any) -> SolverPlan:
    """The plan that reproduces a configured diffusers scheduler (class and config).

    Keys of ``scheduler.config`` that are not options of its class (left there by ``from_config`` of
    another scheduler) are ignored, as diffusers ignores them.
    """
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        raise NotImplementedError(f"scheduler {name} is not supported; supported: {', '.join(sorted(SCHEDULERS))}")
    check_signature(scheduler)
    config = class_config(name, dict(scheduler.config))
    schedule = schedule or NoiseSchedule.from_config(scheduler.config)
    return _finite(SCHEDULERS[name](schedule, config, _check_steps(num_inference_steps), dict(step_options)), schedule)


def plan_for(solver: str, schedule: NoiseSchedule, num_inference_steps: int, **options: Any) -> SolverPlan:
    """The plan of a preset solver name (``"dpmpp-2m"``, ``"ddim"``, ...) on ``schedule``.

    The scheduler class's options come from the schedule's config (the model's own scheduler config:
    what ``X.from_config(model_scheduler.config)`` would take), then the preset, then ``options``: config
    options of the class (diffusers names) or step-time options (``eta=`` for DDIM). An option the class
    does not have raises NotImplementedError (another scheduler's) or TypeError (no scheduler's).
    """
    if solver not in PRESETS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(sorted(PRESETS))}")
    class_name, preset = PRESETS[solver]
    check_options(class_name, options)
    step_keys = STEP_OPTIONS.get(class_name, ())
    step_options = {k: options.pop(k) for k in list(options) if k in step_keys}
    config = class_config(class_name, schedule.config)
    config.update(preset)
    config.update(options)
    config["_class_name"] = class_name
    return _finite(SCHEDULERS[class_name](schedule, config, _check_steps(num_inference_steps), step_options), schedule)


def _finite(plan: SolverPlan, schedule: NoiseSchedule) -> SolverPlan:
    """The plan, after checking that every coefficient is finite: a grid that repeats a noise level (more steps
    than the schedule resolves) makes a solver divide by a zero step size, and the samples would be NaN."""
    for index, row in enumerate(plan.rows):
        combos = [row.out, *(combo for _, combo in row.writes)]
        values = [row.timestep, row.c_in, row.x0_x, row.x0_model,
                  *(v for c in combos for v in (c.x, c.x0, c.model, c.noise, *c.hist.values()))]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{plan.solver}: step {index} of {plan.steps} (timestep {row.timestep:g}) has a non-finite "
                             f"coefficient: the grid repeats a noise level there; use fewer steps than "
                             f"{plan.steps} on this {schedule.num_train_timesteps}-step schedule")
    return plan


MAX_STEPS = 10_000  # a plan is a host table per step: more than this is a mistake, not a sampler


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"num_inference_steps={steps} is more than diffrt plans ({MAX_STEPS})")
    return steps


from . import (  # noqa: E402,F401  (registers the builders)
    ddim, deis, dpm, edm, euler, flow, flow_heun, kdpm2, lcm, lms, pndm, singlestep, tcd, unipc)

__all__ = ["Builder", "Combo", "OPTIONS", "PRESETS", "SCHEDULERS", "SCHEDULE_KEYS", "STEP_OPTIONS", "SolverPlan", "StepRow",
           "class_config", "plan_for", "plan_from_scheduler", "register"]
