"""W8A8 layers, the quantization policy, and per-sample scale selection.

:func:`prepare` computes a layer's W8A8 weights (:class:`W8A8Weights`: int8 weight with
per-output-channel scales, :func:`~diffrt.kernels.int8_spec.quantize_weight`; the activation
scale table fp32 [G], one per timestep group, from calibration) and :func:`patch` gives the layer
(``nn.Linear`` or 1x1 ``nn.Conv2d``) a dispatching forward. The weights live with the optimized
denoiser, not in the module: during its calls the call context's ``int8`` switch
(:mod:`diffrt.runtime.context`) holds ``(group_ids, mode, {module: W8A8Weights})`` with ``group_ids`` int64 [B] on the device, each sample's timestep group,
and a patched layer found there runs the INT8 kernel; any other call (the plain denoiser, another
optimized variant without this layer) runs the layer's float computation. So several INT8
variants of one model coexist, and the state dict never changes.

Rows of sample b (its tokens, or its pixels for a 1x1 conv) are quantized with
``scales[group_ids[b]]``: a batch may mix timesteps (a stream batch), and the table is indexed on
the device, so a CUDA-graph replay with other steps needs no re-capture. ``mode="dynamic"``
quantizes per token instead (max |x| / 127 of each row), for comparison.

:class:`QuantPolicy` chooses the layers: Linear and 1x1 conv layers, except what the literature
keeps in higher precision (time and class embeddings and the adaLN / modulation layers that
consume them, the first and the last of the candidate layers); ``include`` / ``exclude``
fnmatch patterns on module names override it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import types
from dataclasses import dataclass

import torch
from torch import nn

from diffrt.kernels.int8_launch import int8_linear
from diffrt.kernels.int8_spec import dynamic_row_scale, quantize_weight
from diffrt.runtime import context


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


@dataclass
class W8A8Weights:
    """What a W8A8 layer computes with: int8 weight [N, K], its per-channel scales [N], the activation
    scale table [G], SmoothQuant's inverse factors [K] (or None) and the bias (or None)."""

    w_q: torch.Tensor
    w_scale: torch.Tensor
    scales: torch.Tensor
    inv_smooth: torch.Tensor | None
    bias: torch.Tensor | None


def prepare(module: nn.Module, scales: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> W8A8Weights:
    """The W8A8 weights of ``module`` (Linear or 1x1 Conv2d) on its device; SmoothQuant folds s into w."""
    if not is_candidate(module):
        raise ValueError(f"{type(module).__name__} cannot be W8A8 (Linear and 1x1 Conv2d can)")
    device = module.weight.device
    w = module.weight.detach().reshape(module.weight.shape[0], -1).float()
    if inv_smooth is not None:
        inv_smooth = inv_smooth.to(device, torch.float32)
        w = w / inv_smooth[None, :]  # SmoothQuant: x * inv_s and w * s
    w_q, w_scale = quantize_weight(w)
    bias = None if module.bias is None else module.bias.detach().float()
    return W8A8Weights(w_q, w_scale, scales.detach().to(device, torch.float32).contiguous(), inv_smooth, bias)


def patch(module: nn.Module) -> None:
    """Give ``module`` a forward that runs INT8 when the optimized call in progress holds weights for
    it (in the call context's ``int8`` switch) and its own float computation otherwise. Idempotent; the module's
    parameters and state dict do not change."""
    if not is_candidate(module):
        raise ValueError(f"{type(module).__name__} cannot be W8A8 (Linear and 1x1 Conv2d can)")
    forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
    module.forward = types.MethodType(forward, module)


def keep_samples(keep: torch.Tensor) -> contextlib.AbstractContextManager:
    """Narrow the INT8 call in progress to the samples ``keep`` selects (a bool mask or an index over
    its batch), for a model that compacts its batch mid-call (per-sample early exit): a context
    manager (the groups are restored when it exits); a no-op when no static INT8 call is in progress."""
    active = context.current().int8
    if active is None or active[0] is None:
        return contextlib.nullcontext()
    group_ids, mode, weights = active
    return context.switches(int8=(group_ids[keep], mode, weights))


def unpatch(module: nn.Module) -> None:
    """Undo :func:`patch` (the class's forward again)."""
    module.__dict__.pop("forward", None)


def is_patched(module: nn.Module) -> bool:
    return "forward" in module.__dict__ and getattr(module.forward, "__func__", None) in (_linear_forward,
                                                                                       _conv_forward)


def _rows_int8(weights: W8A8Weights, rows: torch.Tensor, batch: int, group_ids, mode: str) -> torch.Tensor:
    """rows [M, K] of ``batch`` samples -> [M, N] through the INT8 kernel (per-sample or per-token scales)."""
    if mode.startswith("qdq"):
        return _rows_qdq(weights, rows, batch, group_ids, mode)
    if mode == "dynamic":
        row_scale = dynamic_row_scale(rows, weights.inv_smooth)
    else:
        if group_ids.shape[0] != batch or rows.shape[0] % batch:
            raise RuntimeError(f"W8A8: {rows.shape[0]} rows for {group_ids.shape[0]} samples; rows must be grouped "
                               "by sample (batch-major)")
        row_scale = weights.scales.index_select(0, group_ids).repeat_interleave(rows.shape[0] // batch)
    return int8_linear(rows, weights.w_q, weights.w_scale, row_scale, weights.bias, inv_smooth=weights.inv_smooth,
                       out_dtype=rows.dtype)


def _rows_qdq(weights: W8A8Weights, rows: torch.Tensor, batch: int, group_ids, mode: str) -> torch.Tensor:
    """The same layer as ONNX QuantizeLinear / DequantizeLinear pairs (for export; see diffrt.export.onnx_export).

    mode "qdq": per-sample scales ``scales[group_ids]`` computed in the graph (QuantizeLinear along the
    batch axis); "qdq-group": ``group_ids`` is one int, a build-time constant scale (what TensorRT
    needs). Weights: per output channel. ONNX quantizes to [-128, 127], the kernels to [-127, 127]:
    the two differ only for activations clipped below -127.5 scales.
    """
    x = rows.reshape(batch, -1, rows.shape[-1]).float()
    if weights.inv_smooth is not None:
        x = x * weights.inv_smooth
    if mode == "qdq-group":
        x = torch.fake_quantize_per_tensor_affine(x, float(weights.scales[group_ids]), 0, -128, 127)
    else:
        scale = weights.scales.index_select(0, group_ids)
        x = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros_like(group_ids, dtype=torch.int32), 0,
                                                   -128, 127)
    w = weights.w_q.float() * weights.w_scale[:, None]  # a constant of the graph: its int8 codes are exact
    w = torch.fake_quantize_per_channel_affine(w, weights.w_scale, torch.zeros(w.shape[0], dtype=torch.int32,
                                                                               device=w.device), 0, -128, 127)
    return nn.functional.linear(x, w, weights.bias).reshape(rows.shape[0], -1).to(rows.dtype)


def _active(module: nn.Module) -> tuple[W8A8Weights, torch.Tensor | None, str] | None:
    """(weights, group_ids, mode) when the optimized call in progress quantizes ``module``, else None."""
    active = context.current().int8
    if active is None:
        return None
    group_ids, mode, layers = active
    weights = layers.get(module)
    return None if weights is None else (weights, group_ids, mode)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    found = _active(self)
    if found is None:
        return nn.Linear.forward(self, x)
    weights, group_ids, mode = found
    out = _rows_int8(weights, x.reshape(-1, x.shape[-1]), x.shape[0], group_ids, mode)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    found = _active(self)
    if found is None:
        return nn.Conv2d.forward(self, x)
    weights, group_ids, mode = found
    batch, channels, height, width = x.shape
    out = _rows_int8(weights, x.permute(0, 2, 3, 1).reshape(-1, channels), batch, group_ids, mode)
    return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def install(model: nn.Module, layer_scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
            ) -> dict[nn.Module, W8A8Weights]:
    """:func:`prepare` and :func:`patch` each named layer of ``model`` with (scales [G], inv_smooth [K] or
    None); returns {module: weights}, what an optimized call puts in the ``int8`` switch."""
    modules = dict(model.named_modules())
    prepared = {}
    for name, (scales, inv_smooth) in layer_scales.items():
        if name not in modules:
            raise ValueError(f"the model has no layer {name!r} (the calibration names it)")
        prepared[modules[name]] = prepare(modules[name], scales, inv_smooth)
        patch(modules[name])
    return prepared


def uninstall(model: nn.Module) -> int:
    """:func:`unpatch` every patched layer of ``model``; returns how many there were."""
    patched = [module for module in model.modules() if is_patched(module)]
    for module in patched:
        unpatch(module)
    return len(patched)
