"""W8A8 layers, the quantization policy, and per-sample scale selection.

:func:`attach` makes an ``nn.Linear`` or 1x1 ``nn.Conv2d`` W8A8 in place: int8 weights with
per-output-channel scales (:func:`~diffrt.kernels.int8_spec.quantize_weight`) and a device table
of activation scales fp32 [G], one per timestep group, chosen by calibration, held as
non-persistent buffers (the state dict does not change). Each call reads :data:`ACTIVE` (set by an optimized denoiser for its own calls):
``(group_ids, mode)`` with ``group_ids`` int64 [B] on the device, the timestep group of each
sample. Rows of sample b (its tokens, or its pixels for a 1x1 conv) are quantized with
``scales[group_ids[b]]``: a batch may mix timesteps (a stream batch), and the table is indexed on
the device, so a CUDA-graph replay with other steps needs no re-capture. ``mode="dynamic"``
quantizes per token instead (max |x| / 127 of each row), for comparison. Outside an optimized
call the layer runs its original float module, so the unquantized denoiser keeps working.

:class:`QuantPolicy` chooses the layers: Linear and 1x1 conv layers, except what the literature
keeps in higher precision (time and class embeddings and the adaLN / modulation layers that
consume them, the first and the last of the candidate layers); ``include`` / ``exclude``
fnmatch patterns on module names override it.
"""
from __future__ import annotations

import contextvars
import fnmatch
import types
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from diffrt.kernels.int8_launch import int8_linear
from diffrt.kernels.int8_spec import dynamic_row_scale, quantize_weight

ACTIVE: contextvars.ContextVar[tuple[torch.Tensor, str] | None] = contextvars.ContextVar("diffrt_int8", default=None)
"""(group_ids int64 [B] on the device, mode "static" | "dynamic") of the optimized call in progress."""

DEFAULT_KEEP = ("*time_emb*", "*timestep_emb*", "*time_proj*", "*t_embedder*", "*class_emb*", "*y_embedder*",
                "*label_emb*", "*add_embedding*", "*adaLN*", "*adaln*", "*norm*.linear", "*emb_proj*",
                "*time_embedding*", "*conv_in*", "*conv_out*", "*x_embedder*", "*final_layer*")


def is_candidate(module: nn.Module) -> bool:
    """Linear, or a 1x1 Conv2d with stride 1, no padding, one group, no dilation."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.groups == 1 and module.dilation == (1, 1))


@dataclass(frozen=True)
class QuantPolicy:
    """Which layers become W8A8 (module docstring); ``keep_first_last`` keeps the first and last candidates."""

    keep: tuple[str, ...] = DEFAULT_KEEP
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True

    def select(self, model: nn.Module) -> list[str]:
        """Names of the layers to quantize, in module order."""
        candidates = [name for name, module in model.named_modules() if name and is_candidate(module)]
        edges = {candidates[0], candidates[-1]} if self.keep_first_last and candidates else set()
        chosen = []
        for name in candidates:
            forced_in = any(fnmatch.fnmatchcase(name, p) for p in self.include)
            kept = (name in edges or any(fnmatch.fnmatchcase(name, p) for p in self.keep)
                    or any(fnmatch.fnmatchcase(name, p) for p in self.exclude))
            if forced_in or not kept:
                chosen.append(name)
        return chosen


# Buffers attach() registers on a layer (non-persistent: the state dict is unchanged).
BUFFERS = ("diffrt_w_q", "diffrt_w_scale", "diffrt_scales", "diffrt_inv_smooth", "diffrt_bias")


def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "diffrt_w_q")


def attach(module: nn.Module, scales: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> None:
    """Make ``module`` (Linear or 1x1 Conv2d) W8A8 in place: int8 weights and scales as buffers, and a
    forward that runs the INT8 kernel inside optimized calls and the original computation otherwise.

    The module keeps its float parameters (the unoptimized denoiser uses them) and its state dict;
    attaching again replaces the previous calibration's buffers.
    """
    if not is_candidate(module):
        raise ValueError(f"{type(module).__name__} cannot be W8A8 (Linear and 1x1 Conv2d can)")
    w = module.weight.detach().reshape(module.weight.shape[0], -1).float()
    if inv_smooth is not None:
        w = w / inv_smooth.to(w.device, torch.float32)[None, :]  # SmoothQuant: x * inv_s and w * s
    w_q, w_scale = quantize_weight(w)
    bias = None if module.bias is None else module.bias.detach().float()
    values = (w_q, w_scale, scales.detach().float(), None if inv_smooth is None else inv_smooth.float(), bias)
    for name, value in zip(BUFFERS, values):
        if name in module._buffers:
            del module._buffers[name]
        module.register_buffer(name, None if value is None else value.to(module.weight.device).contiguous(),
                               persistent=False)
    forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
    module.forward = types.MethodType(forward, module)


def detach(module: nn.Module) -> None:
    """Undo :func:`attach`: drop the buffers, restore the class's forward."""
    for name in BUFFERS:
        module._buffers.pop(name, None)
    module.__dict__.pop("forward", None)


def _rows_int8(module: nn.Module, rows: torch.Tensor, batch: int, active) -> torch.Tensor:
    """rows [M, K] of ``batch`` samples -> [M, N] through the INT8 kernel (per-sample or per-token scales)."""
    group_ids, mode = active
    inv_smooth = module.diffrt_inv_smooth
    if inv_smooth is not None:
        inv_smooth = inv_smooth.float()
    if mode == "dynamic":
        row_scale = dynamic_row_scale(rows, inv_smooth)
    else:
        if group_ids.shape[0] != batch or rows.shape[0] % batch:
            raise RuntimeError(f"W8A8 {type(module).__name__}: {rows.shape[0]} rows for {group_ids.shape[0]} samples; "
                               "rows must be grouped by sample (batch-major)")
        scales = module.diffrt_scales.float()
        row_scale = scales.index_select(0, group_ids).repeat_interleave(rows.shape[0] // batch)
    return int8_linear(rows, module.diffrt_w_q, module.diffrt_w_scale.float(), row_scale, module.diffrt_bias,
                       inv_smooth=inv_smooth, out_dtype=rows.dtype)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    active = ACTIVE.get()
    if active is None:
        return nn.Linear.forward(self, x)
    out = _rows_int8(self, x.reshape(-1, x.shape[-1]), x.shape[0], active)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    active = ACTIVE.get()
    if active is None:
        return nn.Conv2d.forward(self, x)
    batch, channels, height, width = x.shape
    out = _rows_int8(self, x.permute(0, 2, 3, 1).reshape(-1, channels), batch, active)
    return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every W8A8 layer in ``model``."""
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


def install(model: nn.Module, layer_scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> list[str]:
    """:func:`attach` (scales [G], inv_smooth [K] or None) to each named layer of ``model``; returns the names."""
    modules = dict(model.named_modules())
    for name, (scales, inv_smooth) in layer_scales.items():
        if name not in modules:
            raise ValueError(f"the model has no layer {name!r} (the calibration names it)")
        attach(modules[name], scales, inv_smooth)
    return list(layer_scales)


def uninstall(model: nn.Module) -> int:
    """:func:`detach` every W8A8 layer; returns how many there were."""
    layers = list(quantized_layers(model))
    for _, module in layers:
        detach(module)
    return len(layers)
