"""accelerate(pipe) / restore(pipe): a diffusers pipeline with diffrt inside, called as before.

    from diffrt.runtime import accelerate, restore
    pipe = accelerate(pipe)                  # in place; exact by default
    image = pipe(prompt_embeds=..., num_inference_steps=20).images[0]
    restore(pipe)                            # the original behaviour, bit for bit

The pipeline keeps its text encoders, VAE, image processing, call arguments, callbacks and
``output_type``; diffrt takes over two things:

* **the denoising step**: for the duration of each call the pipeline's scheduler (whatever it holds
  *at call time*: a later ``pipe.scheduler = X.from_config(pipe.scheduler.config)`` is honoured) is
  wrapped in a :class:`~diffrt.runtime.fused_scheduler.FusedScheduler`, so each ``scheduler.step`` is
  diffrt's fused solver step reproducing that scheduler (fp32: <= 1e-5 relative). A scheduler or
  option no plan reproduces runs diffusers' own step for that call, with the reason logged.
* **the denoiser** (``pipe.unet`` or ``pipe.transformer``): :func:`~diffrt.runtime.optimize`'s model
  side (diffrt attention, ``todo``, ``sparse``, ``int8``, ``step_cache``, ``dtype``) installed into it
  and switched on inside this pipeline's calls only (the module called directly, or by another pipeline
  sharing it, behaves as before).

Options are :func:`optimize`'s: ``dtype`` (a converted copy of the denoiser runs, its inputs cast to
that dtype and its outputs back), ``attention`` ("auto": diffrt's attention on CUDA, the model's own
elsewhere, where diffrt's would be the same SDPA call; a backend name installs diffrt's processors
anyway; None leaves the model's), ``todo``, ``sparse``, ``int8``, ``step_cache``, ``config`` (a ``diffrt
tune`` file: its model-side part), plus ``step_backend`` (the solver-step backend) and
``adaptive_guidance`` (True or a cosine-similarity threshold, as the Sampler's): in a pipeline call that runs
CFG, a sample whose conditional and unconditional predictions agree that closely drops its unconditional
rows for the rest of the call (the model is called on the still-guided unconditional rows and every
conditional row; the pipeline gets the conditional prediction in place of the dropped ones, so its own CFG
step becomes the conditional step). The decision is a device mask; the host learns how many samples are
still guided through a non-blocking read, a call or more late (no host sync). The evaluations saved are in
``acceleration_of(pipe).guidance_stats``. ``cuda_graphs``: the denoiser call is captured in a CUDA graph
per bucket (the shapes, dtypes and devices of its tensor arguments, and its other arguments' values) and
replayed; off CUDA it runs eagerly. It does not compose with ``step_cache`` (a host decision per call).
Not for pipelines (refused with NotImplementedError): ``linear_ag`` (its coefficients are fitted on a
Sampler's plan).
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import context
from .residency import LaggedRead
from .fused_scheduler import FusedScheduler
from .optimized import OptimizedDenoiser, optimize

log = logging.getLogger(__name__)

DENOISER_NAMES = ("unet", "transformer")
STATE = "_diffrt_acceleration"


@dataclass
class PipelineAcceleration:
    """What :func:`accelerate` changed on a pipeline (kept on it, so :func:`restore` can undo it)."""

    original_class: type
    denoiser_name: str
    module: torch.nn.Module
    fast: OptimizedDenoiser
    step_backend: str
    last_scheduler: FusedScheduler | None = None
    step_states: dict = field(default_factory=dict)  # FusedScheduler's trajectory buffers, reused across calls
    guidance: "AdaptiveGuidance | None" = None
    graphs: "GraphedCalls | None" = None

    @property
    def guidance_stats(self) -> dict[str, Any] | None:
        """Adaptive guidance's model rows of the last call (None without adaptive guidance)."""
        return None if self.guidance is None else self.guidance.stats

    @property
    def fallback(self) -> str | None:
        """Why the last call ran diffusers' own scheduler step (None: it ran diffrt's fused step)."""
        return None if self.last_scheduler is None else self.last_scheduler.fallback


def accelerate(pipe: Any, *, dtype: torch.dtype | None = None, attention: str | None = "auto", todo: Any = None,
               sparse: Any = None, int8: Any = None, step_cache: float | bool | None = None, cuda_graphs: bool = False,
               config: Any = None, adaptive_guidance: Any = None, linear_ag: Any = None,
               step_backend: str = "auto") -> Any:
    """Accelerate a diffusers pipeline in place and return it (module docstring)."""
    denoiser_name = _denoiser_name(pipe)
    if linear_ag is not None:
        raise NotImplementedError("linear_ag is not implemented for accelerate(pipe): its coefficients are fitted on a "
                                  "Sampler's plan (use Sampler(..., linear_ag=fit_linear_ag(...)) on a Denoiser)")
    from .sampler import _adaptive_threshold  # noqa: PLC0415

    threshold = _adaptive_threshold(adaptive_guidance)
    module = getattr(pipe, denoiser_name)
    if cuda_graphs and step_cache not in (None, False):
        raise ValueError("cuda_graphs=True and step_cache do not compose: the cache decides on the host per call, "
                         "a graph replays one decision")
    if getattr(pipe, STATE, None) is not None:
        restore(pipe)
    from .denoiser import Denoiser  # noqa: PLC0415
    from .schedule import NoiseSchedule  # noqa: PLC0415

    if attention == "auto" and todo is None and sparse is None and config is None and _device_of(module).type != "cuda":
        attention = None  # diffrt's attention would be PyTorch's SDPA here, which the model's processors already run
        log.info("accelerate: attention='auto' off CUDA leaves the model's attention as it is (diffrt's would be "
                 "PyTorch SDPA too); attention='torch' installs diffrt's processors anyway")
    placeholder = Denoiser(module, NoiseSchedule.linear())  # optimize() uses the model side only
    fast = optimize(placeholder, dtype=dtype, attention=attention, todo=todo, sparse=sparse, int8=int8,
                    step_cache=step_cache, config=config)
    state = PipelineAcceleration(type(pipe), denoiser_name, module, fast, step_backend,
                                 guidance=None if threshold is None else AdaptiveGuidance(threshold),
                                 graphs=GraphedCalls() if cuda_graphs else None)
    if fast.model is not module or fast.has_switches or state.graphs is not None or state.guidance is not None:
        module.forward = _switching_forward(module, state)
    # else the denoiser runs as it is (exact options on the model's own dtype): no wrapper on its calls
    object.__setattr__(pipe, STATE, state)
    pipe.__class__ = _accelerated_class(type(pipe))
    log.info("accelerate: %s.%s (%s)", type(pipe).__name__, denoiser_name, fast.describe().splitlines()[0])
    return pipe


def restore(pipe: Any) -> Any:
    """Undo :func:`accelerate`: the pipeline's class, its denoiser's forward, processors and layers as they were."""
    state = getattr(pipe, STATE, None)
    if state is None:
        raise ValueError(f"{type(pipe).__name__} is not accelerated (diffrt.runtime.accelerate was not applied)")
    module = state.module
    module.__dict__.pop("forward", None)
    _restore_processors(module)
    if state.fast.int8_weights:
        from diffrt.export import quant  # noqa: PLC0415

        quant.uninstall(module)
    if state.fast.step_cache is not None:
        from .step_cache import block_list  # noqa: PLC0415

        for block in block_list(module):
            block.__dict__.pop("forward", None)
    pipe.__class__ = state.original_class
    object.__delattr__(pipe, STATE)
    return pipe


def acceleration_of(pipe: Any) -> PipelineAcceleration | None:
    """The :class:`PipelineAcceleration` of an accelerated pipeline (None when it is not)."""
    return getattr(pipe, STATE, None)


# ----------------------------------------------------------------------------------------- internals

_CLASSES: dict[type, type] = {}


def _accelerated_class(cls: type) -> type:
    """A subclass of the pipeline's class, same name, whose ``__call__`` runs with a FusedScheduler."""
    if cls not in _CLASSES:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            state: PipelineAcceleration = getattr(self, STATE)
            scheduler = self.__dict__.get("scheduler")
            fused = FusedScheduler(scheduler, state.step_backend, state.step_states)
            state.last_scheduler = fused
            if state.guidance is not None:
                state.guidance.begin(self, cls, args, kwargs)
            self.__dict__["scheduler"] = fused  # bypasses DiffusionPipeline.__setattr__: the config is untouched
            try:
                with context.switches(pipeline=state):
                    return cls.__call__(self, *args, **kwargs)
            finally:
                self.__dict__["scheduler"] = scheduler
        _CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _switching_forward(module: torch.nn.Module, state: PipelineAcceleration):
    """The denoiser's forward: inside this pipeline's accelerated call, the optimized variant (its switches on,
    conditions cast to its dtype when it runs a converted copy); anywhere else, the module as it was."""
    original = type(module).forward
    fast = state.fast

    def forward(*args: Any, **kwargs: Any) -> Any:
        if context.current().pipeline is not state:
            return original(module, *args, **kwargs)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep", 0.0)
        switches = fast.call_switches(sample, timestep)

        def run(*args: Any, **kwargs: Any) -> Any:
            if not switches and fast.model is module:
                return original(module, *args, **kwargs)
            with context.switches(**switches):
                if fast.model is module:
                    return original(module, *args, **kwargs)
                out = fast.model(*_cast(args, fast.dtype), **_cast(kwargs, fast.dtype))
                return _cast(out, sample.dtype)

        if state.graphs is not None:
            run = state.graphs.wrap(run)
        if state.guidance is not None and state.guidance.applies(sample):
            return state.guidance(run, args, kwargs, sample.shape[0])
        return run(*args, **kwargs)
    return forward


class GraphedCalls:
    """Denoiser calls replayed from CUDA graphs (:class:`~diffrt.runtime.graphs.GraphRunner`): the call's
    arguments are flattened into their tensors and a hashable description of everything else; one runner per
    description, one graph per tensor bucket within it. The output keeps its structure (a tensor, a tuple, a
    diffusers output) from the first, eager, call of the bucket."""

    def __init__(self):
        self.runners: dict[Any, Any] = {}

    def wrap(self, run):
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors: list[torch.Tensor] = []
            layout = _flatten((args, kwargs), tensors)
            entry = self.runners.get(layout)
            if entry is None:
                from .graphs import GraphRunner  # noqa: PLC0415

                shape: dict[str, Any] = {}

                def replayable(*values: torch.Tensor) -> torch.Tensor:
                    a, k = _unflatten(layout, iter(values))
                    out = run(*a, **k)
                    shape.setdefault("out", out)
                    return _first_tensor(out)
                entry = self.runners[layout] = (GraphRunner(replayable), shape)
            runner, shape = entry
            prediction = runner(*tensors)
            return _replace_first_tensor(shape["out"], prediction)
        return call


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable layout of ``value`` with its tensors appended to ``tensors`` (placeholders in the layout)."""
    if torch.is_tensor(value):
        tensors.append(value)
        return ("tensor",)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return (type(value).__name__, tuple(_flatten(v, tensors) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _flatten(v, tensors)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"cuda_graphs: the denoiser got an argument of type {type(value).__name__} that is neither "
                        "a tensor nor hashable; it cannot be part of a graph's bucket") from None
    return ("value", value)


def _unflatten(layout: Any, tensors) -> Any:
    kind = layout[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "value":
        return layout[1]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in layout[1]}
    items = [_unflatten(v, tensors) for v in layout[1]]
    return tuple(items) if kind == "tuple" else items


@dataclass
class AdaptiveGuidance:
    """Adaptive guidance inside a pipeline's CFG calls (module docstring): one device mask per pipeline call."""

    threshold: float
    cond_first: bool = False  # the CFG batch's order: [cond; uncond] (DiT) or [uncond; cond] (the others)
    cfg: Any = False  # bool, or a weak reference to a pipeline whose do_classifier_free_guidance says it
    guided: torch.Tensor | None = None
    reader: LaggedRead | None = None
    active: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def begin(self, pipe: Any, cls: type, args: tuple, kwargs: dict) -> None:
        """A pipeline call starts: every sample guided; whether it runs CFG and in which batch order."""
        self.guided, self.reader, self.active = None, None, 0
        self.stats = {"calls": 0, "rows": 0, "cfg_rows": 0, "saved_fraction": 0.0}
        self.cond_first = cls.__name__ == "DiTPipeline"
        if isinstance(getattr(cls, "do_classifier_free_guidance", None), property):
            self.cfg = weakref.ref(pipe)  # read when the model is called: the pipeline sets it in its call
        else:
            bound = inspect.signature(cls.__call__).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            self.cfg = float(bound.arguments.get("guidance_scale", 1.0)) > 1.0

    def applies(self, sample: torch.Tensor) -> bool:
        cfg = self.cfg
        if isinstance(cfg, weakref.ref):
            pipe = cfg()
            cfg = pipe is not None and bool(pipe.do_classifier_free_guidance)
        return bool(cfg) and sample.shape[0] % 2 == 0

    def __call__(self, run, args: tuple, kwargs: dict, rows: int) -> Any:
        """The model call on the still-guided unconditional rows and every conditional row; the output in the
        pipeline's CFG layout, the dropped samples' unconditional rows replaced by their conditional ones."""
        batch = rows // 2
        device = (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).device
        halves = (torch.arange(batch, device=device), torch.arange(batch, rows, device=device))
        cond_index, uncond_index = halves if self.cond_first else halves[::-1]
        if self.guided is None or self.guided.shape[0] != batch:
            self.guided, self.reader, self.active = torch.ones(batch, dtype=torch.bool, device=device), None, batch
        elif self.reader is not None and (seen := self.reader.latest()) is not None:
            self.active = min(self.active, int(seen))
        active = self.active
        if active == batch:
            out = run(*args, **kwargs)
            tensor = _first_tensor(out)
            out_cond, out_uncond = tensor.index_select(0, cond_index), tensor.index_select(0, uncond_index)
            rows_uncond, rows_cond = out_uncond, out_cond
        else:
            order = torch.argsort(self.guided.to(torch.uint8), descending=True, stable=True)[:active]
            picked = torch.cat([uncond_index.index_select(0, order), cond_index])  # guided first, then dropped
            out = run(*_select_rows(args, picked, rows), **_select_rows(kwargs, picked, rows))
            tensor = _first_tensor(out)
            rows_uncond, out_cond = tensor[:active], tensor[active:]
            rows_cond = out_cond.index_select(0, order)
            out_uncond = out_cond.index_copy(0, order, rows_uncond)
        shape = (-1, *([1] * (out_cond.dim() - 1)))
        out_uncond = torch.where(self.guided.view(shape), out_uncond, out_cond)
        similar = torch.nn.functional.cosine_similarity(rows_uncond.flatten(1).float(), rows_cond.flatten(1).float(), dim=1)
        keep = similar < self.threshold
        self.guided = self.guided & keep if active == batch else \
            self.guided.index_put((order,), self.guided.index_select(0, order) & keep)
        if self.reader is None:
            self.reader = LaggedRead(self.guided.sum())
        self.reader.request(self.guided.sum())
        self.stats["calls"] += 1
        self.stats["rows"] += batch + active
        self.stats["cfg_rows"] += rows
        self.stats["saved_fraction"] = 1 - self.stats["rows"] / self.stats["cfg_rows"]
        combined = torch.cat([out_cond, out_uncond] if self.cond_first else [out_uncond, out_cond])
        return _replace_first_tensor(out, combined)


def _first_tensor(out: Any) -> torch.Tensor:
    """The prediction in a denoiser's output: a tensor, the first of a tuple, or a diffusers output's ``sample``."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _replace_first_tensor(out: Any, tensor: torch.Tensor) -> Any:
    if torch.is_tensor(out):
        return tensor
    if isinstance(out, (tuple, list)):
        return type(out)([tensor, *out[1:]])
    return type(out)(**{**out, "sample": tensor})


def _select_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """``value`` with the rows ``index`` of every tensor whose first dim is the CFG batch ``rows`` (nested in
    tuples, lists and dicts); other values (a scalar timestep, position ids) as they are."""
    if torch.is_tensor(value):
        return value.index_select(0, index) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_select_rows(v, index, rows) for v in value)
    if isinstance(value, dict):
        return {k: _select_rows(v, index, rows) for k, v in value.items()}
    return value


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (nested in tuples, lists, dicts, diffusers outputs) cast to ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        cast = {k: _cast(v, dtype) for k, v in value.items()}
        if type(value) is dict:
            return cast
        return type(value)(**cast)
    return value


def _restore_processors(module: torch.nn.Module) -> None:
    from .attention import DIFFUSERS_PROCESSORS  # noqa: PLC0415

    for child in module.modules():
        processor = getattr(child, "processor", None)
        if isinstance(processor, DIFFUSERS_PROCESSORS) and hasattr(child, "set_processor"):
            child.set_processor(processor.original)


def _denoiser_name(pipe: Any) -> str:
    if not hasattr(pipe, "components") or not hasattr(pipe, "scheduler"):
        raise TypeError(f"accelerate takes a diffusers pipeline (a DiffusionPipeline with a scheduler), got "
                        f"{type(pipe).__name__}; for a bare model use Denoiser.from_diffusers + optimize")
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise TypeError(f"{type(pipe).__name__} has no denoiser diffrt knows ({' or '.join(DENOISER_NAMES)})")


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
