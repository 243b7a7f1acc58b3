"""FusedScheduler: a diffusers scheduler's stand-in whose ``step`` is diffrt's fused solver step.

During an accelerated pipeline call (:func:`diffrt.runtime.accelerate`) the pipeline's scheduler is
replaced by a :class:`FusedScheduler` around it, so the pipeline's own denoising loop (its CFG, guidance
rescale, callbacks, img2img start, packing) runs unchanged while each step is one fused kernel reading
its row of the plan that reproduces that scheduler (:func:`~diffrt.runtime.solvers.plan_from_scheduler`):

* ``set_timesteps(...)`` runs the real scheduler's (so everything delegated to it, ``timesteps``,
  ``sigmas``, ``add_noise``, ``init_noise_sigma``, ``order``, ``config``, is as diffusers makes it), then
  builds the plan from its class, config and set_timesteps arguments (custom ``sigmas``, ``mu``) and
  checks that the plan's timesteps are the scheduler's.
* ``scale_model_input(x, t)`` is ``c_in * x`` of the current row; ``step(m, t, x)`` runs the fused step on
  the (already guided) model output m, drawing a row's noise from ``generator`` where diffusers draws it,
  and returns ``prev_sample`` (plus the data prediction, or LCM's ``denoised``, where the class returns
  two outputs). ``set_begin_index(k)`` (img2img) starts at row k.

Nothing diverges silently: a scheduler, option or call the plans do not reproduce makes the whole call
use the real scheduler, with the reason logged once (:attr:`FusedScheduler.fallback`).
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from diffrt.kernels import PreparedStep

from .sampler import randn_tensor
from .solvers import plan_from_scheduler
from .solvers.plan import Combo, SolverPlan

log = logging.getLogger(__name__)

_LOGGED: set[str] = set()
PLAN_CACHE_SIZE = 64  # plans kept across calls (a pipeline called again plans nothing)
STATE_CACHE_SIZE = 8  # trajectory buffers a pipeline keeps across calls (FusedScheduler's ``states``)
_PLAN_CACHE: OrderedDict[tuple, SolverPlan] = OrderedDict()
# what step(..., return_dict=False) returns beside prev_sample, per class: "x0", "denoised" or nothing
SECOND_OUTPUT = {"DDIMScheduler": "x0", "EulerDiscreteScheduler": "x0", "EulerAncestralDiscreteScheduler": "x0",
                 "HeunDiscreteScheduler": "x0", "LMSDiscreteScheduler": "x0", "KDPM2DiscreteScheduler": "x0",
                 "KDPM2AncestralDiscreteScheduler": "x0", "EDMEulerScheduler": "x0", "LCMScheduler": "denoised",
                 "TCDScheduler": "denoised"}
STEP_KEYS = frozenset(("model_output", "timestep", "sample", "generator", "return_dict"))  # step() arguments, not options


class StepOutput:
    """What ``step()`` returns, as diffusers' scheduler outputs do: ``.prev_sample`` (and ``.pred_original_sample``
    or LCM's ``.denoised`` where the class has a second output), indexable like a tuple."""

    def __init__(self, prev_sample: torch.Tensor, second: torch.Tensor | None = None):
        self.prev_sample = prev_sample
        self.pred_original_sample = self.denoised = second

    def to_tuple(self) -> tuple:
        return (self.prev_sample,) if self.denoised is None else (self.prev_sample, self.denoised)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.to_tuple()[index]


class FusedScheduler:
    """Stands in for ``scheduler`` (module docstring); ``backend`` is the solver-step backend. ``states``: a dict
    the owner keeps across calls (one pipeline's), where a trajectory's buffers and prepared step kernel are kept
    and reused by the next call with the same plan and latent shape (reset, not reallocated); None: none kept."""

    def __init__(self, scheduler: Any, backend: str = "auto", states: dict | None = None):
        self.__dict__.update(_scheduler=scheduler, _backend=backend, _states=states, fallback=None, _plan=None, _plans={},
                             _set_arguments={}, _state=None, _begin=0, _step_options={}, _slice=None, _slices=None,
                             _started=False,
                             _set_signature=_signature(scheduler, "set_timesteps"),
                             _step_signature=_signature(scheduler, "step"))
        # pipelines inspect these signatures (custom sigmas, eta, generator): they must be the real ones
        self.__dict__["set_timesteps"] = _with_signature(self._set_timesteps, self._set_signature)
        self.__dict__["step"] = _with_signature(self._step, self._step_signature)
        if hasattr(scheduler, "scale_model_input"):
            self.__dict__["scale_model_input"] = _with_signature(self._scale_model_input,
                                                                 _signature(scheduler, "scale_model_input"))
        if hasattr(scheduler, "set_begin_index"):  # pipelines test for it (PNDM has none)
            self.__dict__["set_begin_index"] = _with_signature(self._set_begin_index,
                                                               _signature(scheduler, "set_begin_index"))

    @property
    def __class__(self):  # noqa: D105 - isinstance(pipe.scheduler, X) is X's answer (pipelines branch on it)
        return type(self.__dict__["_scheduler"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    # ------------------------------------------------------------------ the scheduler interface

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        self._scheduler.set_timesteps(*args, **kwargs)
        bound = self._set_signature.bind(*args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if k not in ("device", "kwargs") and v is not None}
        self.__dict__.update(_set_arguments=arguments, _plans={}, _plan=None, _state=None, _begin=0, _step_options={},
                             _slice=None, _slices=None, _started=False)
        self._use_plan()

    def _set_begin_index(self, begin_index: int = 0) -> None:
        self._scheduler.set_begin_index(begin_index)
        self.__dict__["_begin"] = int(begin_index)

    def _scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        if self._plan is not None and not self._started:
            self._check_start(timestep)
        if self._plan is None:
            return self._scheduler.scale_model_input(sample, timestep)
        row = self._plan.rows[self._row_index()]
        return sample if row.c_in == 1.0 else sample * row.c_in

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        arguments = kwargs if not args else self._step_signature.bind(model_output, timestep, sample, *args,
                                                                       **kwargs).arguments
        if self._plan is not None:  # (this runs every step of every call: the common case reads few attributes)
            if not arguments.keys() <= STEP_KEYS or self._step_options:
                options = {k: v for k, v in arguments.items() if k not in STEP_KEYS}
                if options != self._step_options:
                    self.__dict__["_step_options"] = options
                    self._use_plan()
            if not self._started:
                if self._plan is not None:
                    self._check_start(timestep)
            elif self._slices and self._plan is not None and self._state is not None and self._state.row == 1:
                self._check_second(timestep)
        if self._plan is None:
            return self._scheduler.step(model_output, timestep, sample, *args, **kwargs)
        prev_sample, second = self._fused_step(model_output, sample, arguments.get("generator"))
        if arguments.get("return_dict", True):
            return StepOutput(prev_sample, second)
        return (prev_sample,) if second is None else (prev_sample, second)

    # ------------------------------------------------------------------ plans and the fused step

    def _options(self, slice_start: int | None = None) -> dict[str, Any]:
        """The plan's step options: step()'s (eta, ...) and, for a multistep plan started mid-list, ``begin``."""
        start = self._slice if slice_start is None else slice_start
        return {**self._step_options, **({"begin": start} if start else {})}

    def _plan_for(self, options: dict[str, Any]) -> SolverPlan | None:
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        if key not in self._plans:
            self._plans[key] = self._build(options)
        return self._plans[key]

    def _use_plan(self) -> None:
        """Build (or reuse) the plan for the current options; on anything not reproduced, fall back."""
        plan = self._plan_for(self._options())
        if plan is not None and self._plan is not None and plan.steps != self._plan.steps:
            plan = self._fall_back("the step options change the plan's length")
        self.__dict__["_plan"] = plan

    def _build(self, step_options: dict[str, Any]) -> SolverPlan | None:
        """The plan (checked against the scheduler's timesteps), from the process-wide cache when this scheduler
        class, config, set_timesteps arguments and step options were planned before."""
        key = _plan_key(self._scheduler, self._set_arguments, step_options)
        if key is not None and key in _PLAN_CACHE:
            _PLAN_CACHE.move_to_end(key)
            return _PLAN_CACHE[key]
        plan = self._plan_checked(step_options)
        if key is not None and plan is not None:
            _PLAN_CACHE[key] = plan
            while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
                _PLAN_CACHE.popitem(last=False)
        return plan

    def _plan_checked(self, step_options: dict[str, Any]) -> SolverPlan | None:
        scheduler, arguments = self._scheduler, dict(self._set_arguments)
        steps = arguments.pop("num_inference_steps", None)
        custom = arguments.get("sigmas", arguments.get("timesteps"))
        if steps is None and custom is not None:
            steps = len(custom)
        try:
            plan = plan_from_scheduler(scheduler, int(steps), **arguments, **step_options)
        except (NotImplementedError, ValueError, TypeError) as error:
            return self._fall_back(str(error))
        ours = plan.timesteps().to(torch.float32)
        theirs = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float32).reshape(-1)
        theirs = theirs[int(step_options.get("begin", 0)):]
        if ours.shape != theirs.shape or not torch.equal(ours, theirs):
            return self._fall_back(f"the plan's timesteps {ours.tolist()} are not the scheduler's {theirs.tolist()}")
        return plan

    def _fall_back(self, reason: str) -> None:
        name = type(self._scheduler).__name__
        self.__dict__["fallback"] = reason
        if (name, reason) not in _LOGGED:
            _LOGGED.add((name, reason))
            log.warning("accelerate: %s runs diffusers' own step (%s)", name, reason)
        return None

    def _check_start(self, timestep: Any) -> None:
        """The trajectory's first call: where in the scheduler's timesteps does the loop start? (img2img slices
        them; a scheduler without ``set_begin_index`` finds out from the timestep, and so does this.) A
        stateless plan starts at that row; PNDM's plan is rebuilt from there (``begin``: diffusers' PNDM
        restarts its multistep state); anything else runs diffusers' step."""
        self.__dict__["_started"] = True
        plan = self._plan
        expected = plan.rows[self._begin].timestep if self._begin < plan.steps else None
        given = float(torch.as_tensor(timestep).reshape(-1)[0])  # once per trajectory
        restarts = type(self._scheduler).__name__ in RESTARTING
        if expected is not None and _same(given, expected):
            if self._begin and not _starts_fresh(plan, self._begin):
                if restarts:  # the plan of the rows from there, the solver's warm-up started afresh
                    self.__dict__.update(_slice=self._begin, _begin=0)
                    self.__dict__["_plan"] = self._plan_for(self._options())
                else:
                    self.__dict__["_plan"] = self._fall_back(
                        f"a loop that starts at step {self._begin} (img2img) of a multistep plan: diffusers restarts "
                        "the solver's history there, the plan's rows carry it")
            return
        starts = [i for i, row in enumerate(plan.rows) if _same(row.timestep, given)]
        if starts and _starts_fresh(plan, starts[0]):
            self.__dict__["_begin"] = starts[0]
        elif starts and restarts and type(self._scheduler).__name__ != "PNDMScheduler":
            self.__dict__.update(_slice=starts[0], _begin=0)
            self.__dict__["_plan"] = self._plan_for(self._options())
        elif starts and type(self._scheduler).__name__ == "PNDMScheduler":
            self.__dict__.update(_slices=starts, _slice=starts[0], _begin=0)
            self.__dict__["_plan"] = self._plan_for(self._options())
        else:
            self.__dict__["_plan"] = self._fall_back(f"the loop starts at timestep {given:g}, the plan at {expected} "
                                                     "(a partial trajectory this scheduler's plan cannot start)")

    def _check_second(self, timestep: Any) -> None:
        """PNDM started mid-list at a repeated timestep: the second call says which copy it was (both plans' first
        rows are the same, so the state carries over)."""
        given = float(torch.as_tensor(timestep).reshape(-1)[0])
        for start in self._slices:
            plan = self._plan_for(self._options(start))
            if plan is not None and plan.steps > 1 and _same(plan.rows[1].timestep, given):
                self.__dict__.update(_plan=plan, _slice=start)
                break
        self.__dict__["_slices"] = None

    def _row_index(self) -> int:
        state = self._state
        return self._begin if state is None else state.row

    def _fused_step(self, model_output: torch.Tensor, sample: torch.Tensor, generator: Any):
        plan, state = self._plan, self._state
        if state is None or state.x_shape != sample.shape or state.device != sample.device:
            state = self._new_state(plan, sample)
        elif state.plan is not plan:  # other step options (eta), or PNDM's other start: the rows done are the same
            state.plan, (state.table, state.itable) = plan, _device_tables(plan, sample.device)
            state.noise_index = _noise_index(plan)
        row = plan.rows[state.row]
        if row.noise:
            draw = randn_tensor(sample.shape, generator, sample.device, plan.noise_dtype or model_output.dtype)
            state.noise[state.noise_index[state.row]] = draw.to(sample.dtype)
        out = torch.empty_like(sample, memory_format=torch.contiguous_format)
        if state.launch is None or state.launch_plan is not plan:
            state.launch = PreparedStep(sample, model_output, None, state.history, state.noise, state.table,
                                        state.itable, state.step, out, self._backend)
            state.launch_plan = plan
        state.launch(sample, model_output, None, out, advance=True)
        second = None if state.second is None else self._second_output(state.second, row, sample, model_output)
        state.row += 1
        return out, second

    def _new_state(self, plan: SolverPlan, sample: torch.Tensor) -> SimpleNamespace:
        device, states = sample.device, self._states
        key = (id(plan), sample.shape, sample.dtype, device, self._begin)
        state = None if states is None else states.get(key)
        if state is not None and state.plan is plan:  # an earlier call's buffers: reset as a new state starts
            state.row = self._begin
            state.step.fill_(self._begin)
            if state.history is not None:
                state.history.zero_()
            self.__dict__["_state"] = state
            return state
        table, itable = _device_tables(plan, device)
        noise_index = _noise_index(plan)
        count = plan.n_noise
        state = SimpleNamespace(
            plan=plan, row=self._begin, x_shape=sample.shape, device=device, table=table, itable=itable, launch=None,
            launch_plan=None, second=SECOND_OUTPUT.get(type(self._scheduler).__name__),
            step=torch.full((), self._begin, dtype=torch.int64, device=device), noise_index=noise_index,
            history=torch.zeros((plan.n_slots, *sample.shape), dtype=sample.dtype, device=device) if plan.n_slots else None,
            noise=torch.zeros((count, *sample.shape), dtype=sample.dtype, device=device) if count else None)
        self.__dict__["_state"] = state
        if states is not None:
            if len(states) >= STATE_CACHE_SIZE:
                states.clear()
            states[key] = state
        return state

    def _second_output(self, kind: str, row, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """What step() returns beside prev_sample (``kind``: :data:`SECOND_OUTPUT`), from the step's inputs."""
        x0 = row.x0_x * sample.float() + row.x0_model * model_output.float()
        if row.clip is not None:
            x0 = x0.clamp(-row.clip, row.clip)
        if kind == "denoised" and row.denoised is not None:
            return _evaluate(row.denoised, sample, x0, model_output).to(sample.dtype)
        return x0.to(sample.dtype)


def _plan_key(scheduler: Any, arguments: dict[str, Any], step_options: dict[str, Any]) -> tuple | None:
    """What a plan depends on: the class, its config, the set_timesteps arguments and step options (None when
    one of them has no faithful text form, e.g. a generator: then nothing is cached)."""
    try:
        parts = [("config", _config_text(scheduler))]
        parts += [("set:" + k, _text(v)) for k, v in sorted(arguments.items())]
        parts += [("step:" + k, _text(v)) for k, v in sorted(step_options.items())]
    except TypeError:
        return None
    return (type(scheduler).__name__, tuple(parts))


def _config_text(scheduler: Any) -> str:
    """The scheduler config as text, kept on the scheduler while its config object is the same one."""
    config = scheduler.config
    cached = scheduler.__dict__.get("_diffrt_config_text")
    if cached is None or cached[0] is not config:
        cached = (config, _text(dict(config)))
        scheduler.__dict__["_diffrt_config_text"] = cached
    return cached[1]


def _text(value: Any) -> str:
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in sorted(value.items())) + "}"
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)):  # the exact values: dtype, shape and bytes
        value = np.ascontiguousarray(value)
        return f"array({value.dtype.str},{value.shape},{value.tobytes().hex()})"
    raise TypeError(type(value).__name__)


def _device_tables(plan: SolverPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's coefficient tables on ``device``, made once per plan and device."""
    tables = plan.__dict__.setdefault("_device_tables", {})
    if device not in tables:
        table, itable = plan.tables(None)
        tables[device] = (table.to(device), itable.to(device))
    return tables[device]


# multistep schedulers whose plans take the step option ``begin``: a loop started mid-list (img2img) restarts the
# solver's warm-up there, as diffusers does
RESTARTING = ("PNDMScheduler", "DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
              "LMSDiscreteScheduler", "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler")


def _starts_fresh(plan: SolverPlan, begin: int) -> bool:
    """Whether the rows from ``begin`` on read no history slot before one of them writes it (they do not depend
    on the rows before: the trajectory may start there)."""
    written: set[int] = set()
    for row in plan.rows[begin:]:
        read = {slot for combo in [row.out] + [c for _, c in row.writes] for slot in combo.hist}
        if read - written:
            return False
        written.update(slot for slot, _ in row.writes)
    return True


def _noise_index(plan: SolverPlan) -> list[int]:
    """Each row's index into the trajectory's noise draws."""
    index, count = [], 0
    for row in plan.rows:
        index.append(count)
        count += int(row.noise)
    return index


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(1.0, abs(b))


def _evaluate(combo: Combo, x: torch.Tensor, x0: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """combo.x * x + combo.x0 * x0 + combo.model * m (no noise or history terms: they are not needed here)."""
    return combo.x * x.float() + combo.x0 * x0 + combo.model * model_output.float()


_SIGNATURES: dict[tuple[type, str], inspect.Signature] = {}


def _signature(scheduler: Any, method: str) -> inspect.Signature:
    """The bound signature of ``scheduler.<method>`` (computed once per class)."""
    key = (type(scheduler), method)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(getattr(scheduler, method))
    return _SIGNATURES[key]


def _with_signature(function, signature: inspect.Signature):
    """``function`` presenting ``signature`` to ``inspect.signature`` (pipelines read it); a partial, so a call
    adds no Python frame."""
    proxy = functools.partial(function)
    proxy.__signature__ = signature
    return proxy
