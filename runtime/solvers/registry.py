"""The registry of solver plan builders: diffusers scheduler class -> builder and options; preset names.

Each solver module (ddim, dpm, euler, ...) registers its builder with :func:`register` when the
package imports it, naming the diffusers class it reproduces and that class's config options (its
``__init__`` parameters, diffusers' names; ``tests/test_solver_options.py`` checks them against the
installed diffusers). :func:`diffrt.runtime.solvers.plan_for` and ``plan_from_scheduler`` look them up here.

Config keys are handled as diffusers handles them: ``X.from_config(other.config)`` keeps the other
scheduler's keys in ``.config`` and X ignores the ones that are not its options, so :func:`class_config`
drops them too; an option the caller names that the class does not have is refused (:func:`check_options`).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from ..schedule import NoiseSchedule
from .plan import SolverPlan

Builder = Callable[[NoiseSchedule, dict, int, dict], SolverPlan]

SCHEDULERS: dict[str, Builder] = {}
OPTIONS: dict[str, tuple[str, ...]] = {}
PRESETS: dict[str, tuple[str, dict]] = {}

# Keys of a scheduler config that describe the training schedule, not the solver.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr", "shift", "flow_shift", "use_dynamic_shifting")

# The options every discrete (betas) scheduler of diffusers starts with.
VP_OPTIONS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")

# Options diffusers takes in ``step()`` rather than in the config, per class.
STEP_OPTIONS: dict[str, tuple[str, ...]] = {"DDIMScheduler": ("eta", "use_clipped_model_output")}


def register(scheduler_class: str, options: tuple[str, ...],
             presets: dict[str, dict] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` for a diffusers class (with its config ``options``) and its preset names."""
    def wrap(builder: Builder) -> Builder:
        SCHEDULERS[scheduler_class] = builder
        OPTIONS[scheduler_class] = tuple(options)
        for name, overrides in (presets or {}).items():
            PRESETS[name] = (scheduler_class, overrides)
        return builder
    return wrap


def class_config(scheduler_class: str, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that ``scheduler_class`` takes (plus private ``_`` keys): the others are a
    previous scheduler's, which diffusers ignores as well."""
    known = set(OPTIONS[scheduler_class])
    return {k: v for k, v in config.items() if k in known or k.startswith("_")}


def check_options(scheduler_class: str, options: dict[str, Any]) -> None:
    """Refuse options that are neither config nor step options of ``scheduler_class``: an option of another
    diffusers scheduler raises NotImplementedError (this class would not use it), any other name TypeError
    (a misspelling would otherwise change nothing, silently)."""
    allowed = set(OPTIONS[scheduler_class]) | set(STEP_OPTIONS.get(scheduler_class, ()))
    elsewhere = {o for opts in OPTIONS.values() for o in opts} | {o for opts in STEP_OPTIONS.values() for o in opts}
    for key in options:
        if key in allowed:
            continue
        if key in elsewhere:
            raise NotImplementedError(f"{scheduler_class}: {key!r} is another scheduler's option, not one of this "
                                      "scheduler's; it is not reproduced")
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; its options: {', '.join(sorted(allowed))}"
        raise TypeError(f"{key!r} is not an option of {scheduler_class}{hint}")


def check_signature(scheduler: Any) -> None:
    """Refuse an option of the scheduler's class that diffrt does not know (a newer diffusers) when it is
    set away from its default: diffrt would ignore it while diffusers uses it."""
    name = type(scheduler).__name__
    try:
        parameters = inspect.signature(type(scheduler).__init__).parameters
    except (TypeError, ValueError):
        return
    known = set(OPTIONS[name])
    for key, parameter in parameters.items():
        if key in ("self", "kwargs") or key in known or parameter.kind is parameter.VAR_KEYWORD:
            continue
        value = scheduler.config.get(key, parameter.default)
        if value != parameter.default:
            raise NotImplementedError(f"{name}: option {key}={value!r} is not known to diffrt (a newer diffusers?); "
                                      "it is not reproduced")
