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
tune`` file: its model-side part), plus ``step_backend`` (the solver-step backend). Not yet for
pipelines (refused with NotImplementedError): ``cuda_graphs`` on CUDA, ``adaptive_guidance``, ``linear_ag``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import context
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
    if adaptive_guidance is not None or linear_ag is not None:
        raise NotImplementedError("adaptive_guidance / linear_ag are not implemented for accelerate(pipe) yet: the "
                                  "pipeline does its own CFG (use Sampler(..., adaptive_guidance=...) on a Denoiser)")
    module = getattr(pipe, denoiser_name)
    if cuda_graphs and _device_of(module).type == "cuda":
        raise NotImplementedError("cuda_graphs=True is not implemented for accelerate(pipe) yet (the pipeline's "
                                  "denoiser call takes keyword conditions); use optimize() on a Denoiser")
    if cuda_graphs:
        log.info("accelerate: cuda_graphs=True off CUDA: the denoiser runs eagerly")
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
    state = PipelineAcceleration(type(pipe), denoiser_name, module, fast, step_backend)
    module.forward = _switching_forward(module, state)
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
            fused = FusedScheduler(scheduler, state.step_backend)
            state.last_scheduler = fused
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
        if not switches and fast.model is module:
            return original(module, *args, **kwargs)
        with context.switches(**switches):
            if fast.model is module:
                return original(module, *args, **kwargs)
            out = fast.model(*_cast(args, fast.dtype), **_cast(kwargs, fast.dtype))
            return _cast(out, sample.dtype)
    return forward


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
