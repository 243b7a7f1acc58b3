"""Denoiser: a model, what it predicts, its noise schedule, and how to call it.

``Denoiser(model, schedule, ...)`` wraps any callable; ``Denoiser.from_diffusers(model,
scheduler_config)`` wraps a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` (SD, SDXL, LCM),
``DiTTransformer2DModel``, ``Transformer2DModel``, ``PixArtTransformer2DModel``,
``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` and picks its call convention
(:mod:`diffrt.runtime.diffusers_models`).

Call convention: ``den(x, t, cond=None) -> prediction`` with x [B, C, H, W] (or any
[B, ...] sample), t a float tensor [B] of model timesteps, cond per-sample conditioning
(class labels [B], embeddings [B, L, D], or a dict of named conditions: :mod:`diffrt.runtime.conditions`)
or None; floating conditions are cast to the model's dtype. The prediction has x's shape.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch

from . import conditions
from .diffusers_models import DIFFUSERS_CALLS, CallFn, call_module, class_count, sample_shape
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

# diffusers classes sampled at their config's size only (the others take any H x W, as their pipelines do)
FIXED_RESOLUTION = ("UNet2DModel",)


class Denoiser:
    """A model with its prediction type and noise schedule.

    Args:
        model: any callable; with the default ``call`` it is called ``model(x, t)`` or
            ``model(x, t, cond)`` and returns a tensor shaped like x.
        schedule: the :class:`NoiseSchedule` the model was trained with (its
            ``prediction_type`` says what the model predicts).
        sample_shape: (C, H, W) of one sample, when known (for a model that samples any resolution, its
            default one: only the channels are checked then).
        call: ``call(model, x, t, cond) -> tensor`` for other conventions.
        dtype: the dtype the model computes in (inputs are cast to it); default: its parameters'.
    """

    def __init__(self, model: Any, schedule: NoiseSchedule, sample_shape: tuple[int, ...] | None = None,
                 call: CallFn | None = None, dtype: torch.dtype | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule (NoiseSchedule.from_config(...)), got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.any_resolution = False  # True: sample_shape is a default size, other H x W work too
        self.condition_classes: int | None = None  # class-conditional models: labels are 0..condition_classes-1
        self._call = call or call_module
        first = _first_param(model)
        self.dtype = dtype or (first.dtype if first is not None else None)
        self.device = first.device if first is not None else None

    @property
    def prediction_type(self) -> str:
        """What the model predicts: epsilon, v_prediction, sample or flow."""
        return self.schedule.prediction_type

    @classmethod
    def from_diffusers(cls, model: Any, scheduler_config: Mapping[str, Any] | Any,
                       prediction_type: str | None = None) -> "Denoiser":
        """Wrap a diffusers model with the scheduler config it was trained with.

        ``scheduler_config`` is a scheduler, its ``.config`` or a plain dict. The prediction
        type comes from the config unless given.
        """
        name = type(model).__name__
        call = DIFFUSERS_CALLS.get(name)
        if call is None:
            raise TypeError(f"{name} is not a supported diffusers model ({', '.join(DIFFUSERS_CALLS)}); "
                            "wrap it with Denoiser(model, schedule, call=...) instead")
        schedule = NoiseSchedule.from_config(scheduler_config, prediction_type)
        den = cls(model, schedule, sample_shape=sample_shape(model), call=call)
        den.any_resolution = name not in FIXED_RESOLUTION
        den.condition_classes = class_count(model)
        return den

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Run the model: x [B, ...] at timesteps t [B] -> prediction shaped like x."""
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)
        out = self._call(self.model, x, t, conditions.cast(cond, self.dtype))
        if out.shape != x.shape:
            raise RuntimeError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                               "a denoiser's prediction must have the sample's shape")
        return out

    def __repr__(self) -> str:
        return (f"Denoiser({type(self.model).__name__}, prediction_type={self.prediction_type!r}, "
                f"schedule={self.schedule.kind}, sample_shape={self.sample_shape})")


def _first_param(model: Any) -> torch.Tensor | None:
    """The model's first parameter (None for a plain callable or a module without parameters)."""
    params = getattr(model, "parameters", None)
    if params is None or not inspect.ismethod(params):
        return None
    return next(iter(params()), None)
