"""``optimize(den, ...)``: the same denoiser, with diffrt's kernels inside.

    fast = optimize(den, attention="auto", todo=None, sparse=None)
    fast(x, t, cond)                     # the Denoiser's call signature; Sampler(fast, ...) works as with den

What it does now (later options arrive with their issues and raise NotImplementedError until then):

* ``attention``: the attention of every attention module runs through :func:`diffrt.kernels.attention`
  (processors from :mod:`diffrt.runtime.attention`); ``"auto"`` takes the Triton kernel on CUDA and
  PyTorch's SDPA elsewhere, or name a backend ("triton", "torch", "reference"); None leaves the
  model's attention alone.
* ``todo``: ToDo key/value downsampling in self-attention. ``True`` or an int f: factor f (2 by
  default) on level 0, the model's highest-resolution grid, where it has >= 4096 tokens (the
  paper's default); a :class:`~diffrt.runtime.attention.ToDo` picks levels, factors, the token
  threshold and the mode. Changes the samples: measure with :mod:`diffrt.runtime.quality`.
* ``sparse``: block-sparse self-attention, a :class:`~diffrt.runtime.attention.Sparse` (local
  window or dynamic selection). Changes the samples too.
* ``dtype``: the compute dtype; a model in another dtype is copied and converted (the original
  keeps its own), one already in it is shared.

The processors are installed into the model in place but dispatch on the caller: the returned
:class:`OptimizedDenoiser` turns them on for its own calls only, so ``den`` keeps producing its
original outputs from the same weights (useful for quality comparisons). ``fast.layers`` lists the
attention layers found; ``fast.describe()`` says what was installed.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from . import attention as attn
from .denoiser import Denoiser

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "triton", "torch", "reference")


class OptimizedDenoiser(Denoiser):
    """A :class:`Denoiser` whose calls run diffrt's attention (see :func:`optimize`)."""

    def __init__(self, base: Denoiser, model: Any, settings: attn.AttentionSettings | None,
                 layers: list[attn.Layer], dtype: torch.dtype | None):
        super().__init__(model, base.schedule, sample_shape=base.sample_shape, call=base._call, dtype=dtype)
        self.base = base
        self.settings = settings
        self.layers = layers

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if self.settings is None:
            return super().__call__(x, t, cond)
        sample_hw = tuple(x.shape[-2:]) if x.dim() >= 4 else None
        token = attn.ACTIVE.set((self.settings, sample_hw))
        try:
            return super().__call__(x, t, cond)
        finally:
            attn.ACTIVE.reset(token)

    def describe(self) -> str:
        """What optimize() installed, one line per attention layer."""
        s = self.settings
        lines = [f"OptimizedDenoiser({type(self.model).__name__}, dtype={self.dtype}, attention="
                 f"{None if s is None else s.backend!r}, todo={None if s is None else s.todo}, "
                 f"sparse={None if s is None else s.sparse})"]
        lines += [f"  {layer.name}: {layer.kind}-attention, {layer.heads} heads x {layer.head_dim}" for layer in self.layers]
        return "\n".join(lines)


def _todo_config(todo: Any) -> attn.ToDo | None:
    if todo is None or todo is False:
        return None
    if todo is True:
        return attn.ToDo()
    if isinstance(todo, attn.ToDo):
        return todo
    if isinstance(todo, int) and todo >= 1:
        return attn.ToDo(factor=todo)
    raise TypeError(f"todo must be None, True, an int factor >= 1 or a diffrt.runtime.attention.ToDo; got {todo!r}")


def optimize(den: Denoiser, dtype: torch.dtype | None = None, attention: str | None = "auto", todo: Any = None,
             sparse: attn.Sparse | None = None, int8: Any = None, cuda_graphs: bool = False,
             backend: str = "native") -> OptimizedDenoiser:
    """An :class:`OptimizedDenoiser` of ``den`` (module docstring for the options)."""
    if not isinstance(den, Denoiser):
        raise TypeError(f"optimize takes a Denoiser (Denoiser.from_diffusers(...), models.load(...)), got "
                        f"{type(den).__name__}")
    for name, value, default in (("int8", int8, None), ("cuda_graphs", cuda_graphs, False), ("backend", backend, "native")):
        if value != default:
            raise NotImplementedError(f"optimize({name}={value!r}) is not implemented yet; leave it at {default!r}")
    if attention is not None and attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be None or one of {', '.join(ATTENTION_BACKENDS)}; got {attention!r}")
    if sparse is not None and not isinstance(sparse, attn.Sparse):
        raise TypeError(f"sparse must be None or a diffrt.runtime.attention.Sparse, got {type(sparse).__name__}")
    todo_config = _todo_config(todo)
    if attention is None and (todo_config is not None or sparse is not None):
        raise ValueError("todo and sparse run inside diffrt's attention: leave attention='auto' (or name a backend)")

    model = den.model
    if dtype is not None and dtype != den.dtype:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"dtype={dtype} needs an nn.Module to convert; the model is {type(model).__name__}")
        model = copy.deepcopy(model).to(dtype)
        log.info("optimize: converted a copy of the model to %s", dtype)
    settings, layers = None, []
    if attention is not None:
        layers = attn.install(model) if isinstance(model, torch.nn.Module) else []
        if not layers:
            message = f"{type(model).__name__} has no attention layers diffrt can run"
            if todo_config is not None or sparse is not None or attention != "auto":
                raise ValueError(f"{message}; attention={attention!r}, todo and sparse need them")
            log.info("optimize: %s; attention left as it is", message)
        else:
            settings = attn.AttentionSettings(attention, todo_config, sparse)
            log.info("optimize: diffrt attention in %d layers (%s), todo=%s, sparse=%s", len(layers), attention,
                     todo_config, sparse)
    return OptimizedDenoiser(den, model, settings, layers, dtype or den.dtype)
