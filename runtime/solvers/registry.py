"""The registry of solver plan builders: diffusers scheduler class -> builder, preset names -> (class, options).

Each solver module (ddim, dpm, euler, ...) registers its builder with :func:`register` when the
package imports it; :func:`diffrt.runtime.solvers.plan_for` and ``plan_from_scheduler`` look them up here.
"""
from __future__ import annotations

from typing import Callable

from ..schedule import NoiseSchedule
from .plan import SolverPlan

Builder = Callable[[NoiseSchedule, dict, int, dict], SolverPlan]

SCHEDULERS: dict[str, Builder] = {}
PRESETS: dict[str, tuple[str, dict]] = {}

# Keys of a scheduler config that describe the training schedule, not the solver.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr", "shift", "flow_shift", "use_dynamic_shifting")


def register(scheduler_class: str, presets: dict[str, dict] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` for a diffusers class and its preset solver names."""
    def wrap(builder: Builder) -> Builder:
        SCHEDULERS[scheduler_class] = builder
        for name, overrides in (presets or {}).items():
            PRESETS[name] = (scheduler_class, overrides)
        return builder
    return wrap


# Options diffusers takes in ``step()`` rather than in the config, per class.
STEP_OPTIONS: dict[str, tuple[str, ...]] = {"DDIMScheduler": ("eta", "use_clipped_model_output")}
