"""Step caching, first-block-cache style: skip a transformer's later blocks while its first block barely changes.

At every model call the first block runs; its residual r = block_0(h) - h is compared with the
previous call's: when mean|r - r_prev| / mean|r_prev| < ``threshold`` the remaining blocks are
skipped and the residual they added last time (``rest`` = h_N - h_1, cached when they last ran)
is added back. Training-free. The change is computed on the device and reaches the host through a
non-blocking read (:class:`~diffrt.runtime.residency.LaggedRead`): a call decides on the newest change
that has arrived, the previous call's on CPU (a call or more late on a GPU, where the host runs ahead),
so no call waits for the device (``synchronous=True``: decide on the call's own change, one blocking
read per call). The skip itself is a host branch: kernels are not launched. Works on any sequential block list:
:class:`~diffrt.runtime.models.dit.DigitsDiT` (``blocks``) and diffusers' DiT / Transformer2D /
PixArt (``transformer_blocks``); UNets (DeepCache's feature reuse) are not covered and are refused.

The blocks get a dispatching forward (their modules and state dict stay as they were): only calls
made while the call context's ``step_cache`` switch (:mod:`diffrt.runtime.context`) holds a
:class:`StepCache` (an optimized denoiser's) use it. The cache
holds one trajectory; the Sampler resets it at the start of each ``sample()`` (``reset_cache``).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import context
from .residency import LaggedRead

@dataclass
class StepCache:
    """The state of one trajectory's first-block cache (module docstring)."""

    threshold: float = 0.05
    synchronous: bool = False  # decide on the call's own change (a blocking read per call)
    calls: int = 0
    skipped: int = 0
    _previous: torch.Tensor | None = field(default=None, repr=False)
    _first_out: torch.Tensor | None = field(default=None, repr=False)
    _rest: torch.Tensor | None = field(default=None, repr=False)
    _skip: bool = False
    _reader: LaggedRead | None = field(default=None, repr=False)

    def reset(self) -> None:
        self._previous = self._first_out = self._rest = self._reader = None
        self._skip = False

    @property
    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "skipped": self.skipped,
                "skipped_fraction": self.skipped / self.calls if self.calls else 0.0}

    def run(self, index: int, count: int, block: nn.Module, forward, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            out = forward(block, *args, **kwargs)
            residual = out - hidden
            self._skip = False
            if self._previous is not None and self._previous.shape == residual.shape:
                change = (residual - self._previous).abs().mean() / self._previous.abs().mean().clamp_min(1e-12)
                if self.synchronous:
                    self._skip = float(change) < self.threshold  # the blocking read of the synchronous mode
                elif self._reader is not None and (seen := self._reader.latest()) is not None:
                    self._skip = float(seen) < self.threshold  # an earlier call's change, already on the host
                if self._reader is None:
                    self._reader = LaggedRead(change)
                self._reader.request(change)
                self._skip = self._skip and self._rest is not None and self._rest.shape == out.shape
            else:
                self._reader = None  # a new shape: earlier changes say nothing about it
            self._previous, self._first_out = residual, out
            self.calls += 1
            self.skipped += int(self._skip)
            return out
        if self._skip:
            return hidden + self._rest if index == count - 1 else hidden
        out = forward(block, *args, **kwargs)
        if index == count - 1:
            self._rest = out - self._first_out
        return out


def block_list(model: nn.Module) -> nn.ModuleList:
    """The sequential transformer blocks of ``model``; ValueError for a model without them (a UNet)."""
    for name in ("blocks", "transformer_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) >= 2:
            if getattr(model, "single_transformer_blocks", None) is not None:
                break  # Flux: two block lists with joint streams
            return blocks
    raise ValueError(f"{type(model).__name__} has no single sequential transformer block list (blocks / "
                     "transformer_blocks): step caching covers DiT-style transformers, not UNets or Flux")


def install(model: nn.Module) -> int:
    """Give the model's blocks dispatching forwards (idempotent); returns the block count."""
    blocks = block_list(model)
    count = len(blocks)
    for index, block in enumerate(blocks):
        block.forward = types.MethodType(_dispatching(index, count, type(block).forward), block)
    return count


def _dispatching(index: int, count: int, forward):
    def dispatch(self, *args, **kwargs):
        cache = context.current().step_cache
        if cache is None:
            return forward(self, *args, **kwargs)
        return cache.run(index, count, self, forward, args, kwargs)
    return dispatch
