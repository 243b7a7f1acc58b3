"""Checks ``diffrt serve`` makes before anything runs: the models it was asked to serve (at startup) and
whether a solver can sample a model in a number of steps (per request, before the queue), each
failure with a message that says what to change."""
from __future__ import annotations

from pathlib import Path

from diffrt.bench import zoo


def check_model_names(names: tuple[str, ...]) -> None:
    """Raise ValueError naming an unknown model and the available ones (at startup, not at the first request)."""
    available = f"{', '.join(zoo.NAMES)} (a ':tiny' suffix for the toy sizes), or a diffusers model folder"
    if not names:
        raise ValueError(f"no models to serve; name one of {available}")
    for name in names:
        if Path(name).is_dir():
            continue
        base, _, variant = name.partition(":")
        if base not in zoo.NAMES or variant not in ("", "tiny"):
            raise ValueError(f"unknown model {name!r}: the server can serve {available}")


PLAN_ERRORS = (ValueError, TypeError, NotImplementedError)
SUGGESTED_SOLVERS = ("dpmpp-2m", "euler", "ddim", "unipc", "flow-euler", "flow-heun")


def _plan_error(workload: zoo.Workload, solver: str, steps: int) -> Exception | None:
    """The error building ``solver``'s plan in ``steps`` steps for the workload raises (None: it builds)."""
    from diffrt.bench.benchmark import scheduler_options  # noqa: PLC0415
    from diffrt.runtime.solvers import plan_for  # noqa: PLC0415

    try:
        plan_for(solver, workload.den.schedule, steps, **scheduler_options(workload, solver))
    except PLAN_ERRORS as error:
        return error
    return None


def plan_problem(model: str, workload: zoo.Workload, solver: str, steps: int) -> str | None:
    """None when the plan builds; otherwise the error and what to change (fewer steps, or another solver)."""
    error = _plan_error(workload, solver, steps)
    if error is None:
        return None
    fewer = _most_steps(workload, solver, steps - 1)
    if fewer is not None:
        advice = f"ask for steps <= {fewer} with solver {solver!r}, or another solver"
    else:
        working = [s for s in SUGGESTED_SOLVERS if s != solver and _plan_error(workload, s, steps) is None][:3]
        advice = f"ask for another solver{' such as ' + ', '.join(working) if working else ''}"
    return f"solver {solver!r} cannot sample {model} with steps={steps}: {error}; {advice}"


def _most_steps(workload: zoo.Workload, solver: str, upper: int) -> int | None:
    """The largest step count <= ``upper`` whose plan builds (a bisection: limits are upper bounds), or None."""
    if upper < 1 or _plan_error(workload, solver, 1) is not None:
        return None
    low, high = 1, upper  # low builds; find the largest that does
    while low < high:
        middle = (low + high + 1) // 2
        if _plan_error(workload, solver, middle) is None:
            low = middle
        else:
            high = middle - 1
    return low
