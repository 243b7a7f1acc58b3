"""diffrt attention inside real models: processors for diffusers' attention modules and the reference DiT.

:func:`install` puts a :class:`DiffrtProcessor` (or :class:`DiffrtFluxProcessor`) on every
attention module of a diffusers model (``Attention``: UNet2DModel, UNet2DConditionModel,
DiT / Transformer2D / PixArt blocks; ``FluxAttention``: Flux-style joint blocks; ``LTXAttention``:
LTX-Video; ``WanAttention``: Wan 2.1 / 2.2) and on the attention of :class:`~diffrt.runtime.models.dit.DigitsDiT`. The processors keep the module's
original processor and **dispatch**: while an :class:`~diffrt.runtime.optimize.OptimizedDenoiser`
call is running (it sets the call context's ``attention`` switch, :mod:`diffrt.runtime.context`, to its
:class:`AttentionSettings` and the sample's H x W),
attention runs through :func:`diffrt.kernels.attention`; otherwise the original processor runs.
So the optimized denoiser and the plain one share the model's weights and both keep working.

What an active call does per layer (:func:`plan_layer`):

* **ToDo** (:class:`ToDo`, self-attention only): the layer's token grid is found from the sample's
  H x W and the token count (UNet levels are H/s x W/s for s = 1, 2, 4, ...; a transformer's grid
  is its patch grid); its *level* is log2 of its scale relative to the model's finest grid (0 =
  the highest resolution). Keys and values are downsampled by ``factor_at(level)`` where the layer
  has at least ``min_tokens`` tokens. Default: factor 2 at level 0 from 4096 tokens (the paper's).
* **Block sparsity** (:class:`Sparse`, self-attention only, from ``min_tokens``): a local window on
  the token grid (static, built once per grid for all layers) or SpargeAttn-style dynamic
  selection per call.
* Requests the fused path cannot serve (an attention mask, extra processor arguments) run the
  original processor, logged once per layer.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffrt.kernels import KVDownsample, attention, attention_masks
from diffrt.kernels.attention_launch import MAX_HEAD_DIM

from . import context

log = logging.getLogger(__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_SCALE = 64  # token grids are searched at scales 1, 2, 4, ..., MAX_SCALE of the sample


@dataclass(frozen=True)
class ToDo:
    """Token downsampling of keys/values: ``factor`` (int: at level 0 only; or {level: factor}),
    applied to self-attention layers with >= ``min_tokens`` tokens; ``mode`` nearest / average."""

    factor: int | dict[int, int] = 2
    min_tokens: int = 4096
    mode: str = "nearest"

    def __post_init__(self) -> None:
        factors = self.factor.values() if isinstance(self.factor, dict) else [self.factor]
        if isinstance(self.factor, dict) and not all(_is_int(level) and level >= 0 for level in self.factor):
            raise ValueError(f"ToDo: factor levels must be ints >= 0, got {sorted(self.factor, key=str)}")
        if not all(_is_int(f) and f >= 1 for f in factors):
            raise ValueError(f"ToDo: factor must be an int >= 1 (or {{level: int >= 1}}), got {self.factor!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"ToDo: min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.mode not in ("nearest", "average"):
            raise ValueError(f"ToDo: mode must be 'nearest' or 'average', got {self.mode!r}")

    def factor_at(self, level: int) -> int:
        if isinstance(self.factor, dict):
            return int(self.factor.get(level, 1))
        return int(self.factor) if level == 0 else 1


@dataclass(frozen=True)
class Sparse:
    """Block-sparse self-attention for layers with >= ``min_tokens`` tokens.

    ``kind="window"``: :func:`~diffrt.kernels.attention_masks.local_window` with ``radius`` (tokens,
    on the layer's grid); ``kind="dynamic"``: :func:`~diffrt.kernels.attention_masks.dynamic` with
    ``tau`` or ``topk`` and ``min_similarity``. Blocks of ``q_block`` x ``k_block`` tokens.
    """

    kind: str = "window"
    radius: int = 8
    tau: float | None = 0.98
    topk: float | None = None
    min_similarity: float = 0.5
    q_block: int = 64
    k_block: int = 64
    min_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in ("window", "dynamic"):
            raise ValueError(f"Sparse: kind must be 'window' or 'dynamic', got {self.kind!r}")
        for name in ("radius", "q_block", "k_block"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"Sparse: {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"Sparse: min_tokens must be an int >= 0, got {self.min_tokens!r}")
        for name in ("tau", "topk"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"Sparse: {name} must be None or in (0, 1], got {value!r}")
        if not (isinstance(self.min_similarity, (int, float)) and -1 <= self.min_similarity <= 1):
            raise ValueError(f"Sparse: min_similarity must be in [-1, 1], got {self.min_similarity!r}")


@dataclass
class AttentionSettings:
    """What an optimized call does in the attention layers."""

    backend: str = "auto"
    todo: ToDo | None = None
    sparse: Sparse | None = None
    mask_cache: dict = field(default_factory=dict, repr=False)  # static masks per (grids, device), all layers


@dataclass
class Layer:
    """One attention module of the model, as :func:`install` found it."""

    name: str
    kind: str  # "self", "cross" or "joint" (Flux: text and image tokens attend together)
    heads: int
    head_dim: int
    finest_scale: int  # the scale of the model's finest token grid (a transformer's patch size, else 1)
    fixed_grid: tuple[int, int] | None = None  # known token grid (the reference DiT)
    fallback_logged: bool = False


def token_grid(sample_hw: tuple[int, int] | None, tokens: int, finest_scale: int) -> tuple[tuple[int, int], int] | None:
    """((h, w), level) of a layer with ``tokens`` tokens for a sample of H x W, or None if no scale fits."""
    if sample_hw is None:
        return None
    height, width = sample_hw
    scale = 1
    while scale <= MAX_SCALE:
        grid = (-(-height // scale), -(-width // scale))
        if grid[0] * grid[1] == tokens:
            return grid, _level(scale, finest_scale)
        scale *= 2
    return None


def _level(scale: float, finest_scale: int) -> int:
    """log2(scale / finest scale), rounded; 0 for the finest grid (and anything finer)."""
    return max(0, round(math.log2(max(scale, 1e-9) / finest_scale)))


def plan_layer(settings: AttentionSettings, layer: Layer, q: torch.Tensor, k: torch.Tensor,
               grid_level: tuple[tuple[int, int], int] | None, self_attention: bool):
    """(kv_downsample, block_mask) for one call of ``layer``: see the module docstring."""
    tokens = k.shape[1]
    if not self_attention or grid_level is None:
        return None, None
    grid, level = grid_level
    down = None
    todo = settings.todo
    if todo is not None and tokens >= todo.min_tokens and todo.factor_at(level) > 1:
        down = KVDownsample(grid, todo.factor_at(level), todo.mode)
    sparse = settings.sparse
    if sparse is None or tokens < sparse.min_tokens:
        return down, None
    k_len = tokens if down is None else down.out_tokens
    if sparse.kind == "window":
        key = (grid, None if down is None else down.out_grid, str(q.device))
        if key not in settings.mask_cache:
            settings.mask_cache[key] = attention_masks.local_window(
                grid, sparse.radius, sparse.q_block, sparse.k_block, k_grid=None if down is None else down.out_grid,
                device=q.device)
        mask = settings.mask_cache[key]
    else:
        from diffrt.kernels.attention_spec import downsample_kv_reference  # noqa: PLC0415

        keys = k if down is None else downsample_kv_reference(k, down)
        mask = attention_masks.dynamic(q, keys, sparse.q_block, sparse.k_block, tau=sparse.tau, topk=sparse.topk,
                                       min_similarity=sparse.min_similarity)
    if mask.k_len != k_len:
        raise RuntimeError(f"{layer.name}: block mask for {mask.k_len} keys, the call has {k_len}")
    return down, mask


def _fused(layer: Layer, settings: AttentionSettings, q, k, v, grid_level, self_attention: bool) -> torch.Tensor:
    """diffrt attention of one call, scale 1/sqrt(D) like the processors it replaces (AttnProcessor2_0
    does not apply ``attn.scale`` either: the same samples)."""
    down, mask = plan_layer(settings, layer, q, k, grid_level, self_attention)
    return attention(q, k, v, kv_downsample=down, block_mask=mask, backend=settings.backend)


def _log_fallback(layer: Layer, reason: str) -> None:
    if not layer.fallback_logged:
        layer.fallback_logged = True
        log.warning("%s: running the original attention processor (%s)", layer.name, reason)


class _Processor:
    """What diffrt's processors share: the module's original processor, the layer's plan, and the choice per call
    between diffrt's attention and the original (:meth:`_active`)."""

    def __init__(self, original: Any, layer: Layer):
        self.original = original
        self.layer = layer

    def _active(self, fallback: str | None) -> tuple | None:
        """(settings, sample H x W) when diffrt's attention runs this call; None when the original processor must:
        outside an optimized call, or for ``fallback`` (a reason, logged once per layer)."""
        active = context.current().attention
        if active is not None and fallback is not None:
            _log_fallback(self.layer, fallback)
            return None
        return active


class DiffrtProcessor(_Processor):
    """diffusers ``Attention`` processor (the computation of AttnProcessor2_0, attention by diffrt)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        active = self._active("an attention mask or extra arguments" if attention_mask is not None
                              else f"extra arguments {sorted(kwargs)}" if args or kwargs else None)
        if active is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        settings, sample_hw = active
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self_attention = encoder_hidden_states is None
        query = attn.to_q(hidden_states)
        if self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        batch, tokens = query.shape[:2]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, tokens, attn.heads, head_dim)
        key = key.view(batch, key.shape[1], attn.heads, head_dim)
        value = value.view(batch, value.shape[1], attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if four_d:  # the grid is the feature map's; its level follows from the sample's height
            scale = sample_hw[0] / height if sample_hw is not None else 1
            grid_level = ((height, width), _level(scale, self.layer.finest_scale))
        else:
            grid_level = token_grid(sample_hw, tokens, self.layer.finest_scale)
        out = _fused(self.layer, settings, query, key, value, grid_level, self_attention)
        hidden_states = attn.to_out[1](attn.to_out[0](out.reshape(batch, tokens, -1).to(query.dtype)))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class DiffrtFluxProcessor(_Processor):
    """diffusers ``FluxAttention`` processor (FluxAttnProcessor's computation, attention by diffrt).

    Joint blocks concatenate text and image tokens, so ToDo and window masks do not apply there;
    single-stream and image-only self-attention get them like any self-attention.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None):
        active = self._active("an attention mask" if attention_mask is not None else None)
        if active is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb  # noqa: PLC0415
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections  # noqa: PLC0415

        settings, sample_hw = active
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states,
                                                                              encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
        if joint:
            enc_query, enc_key, enc_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (enc_query, enc_key, enc_value))
            enc_query, enc_key = attn.norm_added_q(enc_query), attn.norm_added_k(enc_key)
            query, key = torch.cat([enc_query, query], dim=1), torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        grid_level = None if joint else token_grid(sample_hw, query.shape[1], self.layer.finest_scale)
        out = _fused(self.layer, settings, query, key, value, grid_level, not joint)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text, image = hidden_states.split_with_sizes([encoder_hidden_states.shape[1],
                                                      hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


class DiffrtJointProcessor(_Processor):
    """diffusers ``JointAttnProcessor2_0`` (Stable Diffusion 3's MMDiT blocks), attention by diffrt: image
    and text tokens attend jointly ([image, text]), so ToDo and window masks do not apply."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        active = self._active("an attention mask or extra arguments" if attention_mask is not None or args or kwargs
                              else None)
        if active is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, image_tokens = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:  # over the head dim, as on diffusers' [B, H, L, D] layout
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q = heads(attn.add_q_proj(encoder_hidden_states))
            text_k = heads(attn.add_k_proj(encoder_hidden_states))
            text_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        out = _fused(self.layer, active[0], query, key, value, None, encoder_hidden_states is None)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


class DiffrtLTXProcessor(_Processor):
    """diffusers ``LTXVideoAttnProcessor`` (LTX-Video's ``LTXAttention``), attention by diffrt: q/k RMSNorm across
    heads, LTX's interleaved RoPE on the video self-attention. The text cross-attention carries the prompt's
    attention mask, so it runs the original processor (logged once per layer)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None):
        active = self._active("an attention mask" if attention_mask is not None else None)
        if active is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb  # noqa: PLC0415

        self_attention = encoder_hidden_states is None
        states = hidden_states if self_attention else encoder_hidden_states
        query, key, value = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(states)), attn.to_v(states)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        grid_level = token_grid(active[1], query.shape[1], self.layer.finest_scale) if self_attention else None
        out = _fused(self.layer, active[0], query, key, value, grid_level, self_attention)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on [B, L, H, D] (WanAttnProcessor's inner ``apply_rotary_emb``, which diffusers does not export):
    interleaved pairs, float64 tables on CPU, the result in the input's dtype."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _frame_grid(sample_hw: tuple[int, int] | None, tokens: int, patch: int) -> tuple[tuple[int, int], int] | None:
    """((h, w), 0) when a video model's ``tokens`` are one frame's patch grid (an image); None for several frames
    (frames x grid is no 2-D token grid: ToDo and window masks do not apply) or an unknown sample size."""
    if sample_hw is None:
        return None
    grid = (sample_hw[0] // patch, sample_hw[1] // patch)
    return (grid, 0) if grid[0] * grid[1] == tokens else None


class DiffrtWanProcessor(_Processor):
    """diffusers ``WanAttnProcessor`` (Wan 2.1 / 2.2's ``WanAttention``), attention by diffrt: q/k RMSNorm across
    heads, Wan's interleaved RoPE on the video self-attention, the text cross-attention. Image-to-video
    cross-attention (the added image keys / values) and attention masks run the original processor (logged once
    per layer)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None, **kwargs):
        active = self._active("an attention mask" if attention_mask is not None else
                              "image-to-video's added image keys" if attn.add_k_proj is not None else
                              f"extra arguments {sorted(kwargs)}" if kwargs else None)
        if active is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections  # noqa: PLC0415

        self_attention = encoder_hidden_states is None
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        grid_level = _frame_grid(active[1], query.shape[1], self.layer.finest_scale) if self_attention else None
        out = _fused(self.layer, active[0], query, key, value, grid_level, self_attention)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class DiTProcessor:
    """Processor of a model's own attention modules (:meth:`DigitsDiT.qkv_attention_layers
    <diffrt.runtime.models.dit.DigitsDiT.qkv_attention_layers>`): ``processor(module, q, k, v)`` with
    q, k, v [B, L, H, D] -> [B, L, H, D], or None outside an optimized call (the module's own attention)."""

    def __init__(self, layer: Layer):
        self.layer = layer

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        active = context.current().attention
        if active is None:
            return None
        grid_level = (self.layer.fixed_grid, 0) if self.layer.fixed_grid is not None else None
        return _fused(self.layer, active[0], q, k, v, grid_level, True)


DIFFUSERS_PROCESSORS = (DiffrtProcessor, DiffrtFluxProcessor, DiffrtJointProcessor, DiffrtLTXProcessor,
                        DiffrtWanProcessor)


def _original(processor: Any) -> Any:
    return processor.original if isinstance(processor, DIFFUSERS_PROCESSORS) else processor


def install(model: torch.nn.Module) -> list[Layer]:
    """Put diffrt's processors on every attention module of ``model``; return the layers found.

    A model may bring its own attention modules through a ``qkv_attention_layers()`` method (the digits
    DiT: :class:`DiTProcessor`); otherwise diffusers' ``Attention`` / ``FluxAttention`` modules are found.
    Raises ValueError for a module whose processor is not one diffrt reproduces (a custom or
    IP-adapter processor) or whose head dim the kernel cannot serve. Installing twice is harmless.
    """
    layers: list[Layer] = []
    own_layers = getattr(model, "qkv_attention_layers", None)  # a model's own attention modules (the digits DiT)
    if callable(own_layers):
        for name, module, heads, head_dim, grid in own_layers():
            layer = Layer(name, "self", heads, head_dim, 1, fixed_grid=grid)
            module.processor = DiTProcessor(layer)
            layers.append(layer)
        return layers
    try:
        from diffusers.models.attention_processor import (  # noqa: PLC0415
            Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0)
    except ImportError:
        return layers
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor  # noqa: PLC0415
    except ImportError:
        FluxAttention = FluxAttnProcessor = ()  # noqa: N806 - an older diffusers without Flux
    try:
        from diffusers.models.transformers.transformer_ltx import LTXAttention, LTXVideoAttnProcessor  # noqa: PLC0415
    except ImportError:
        LTXAttention = LTXVideoAttnProcessor = ()  # noqa: N806 - an older diffusers without LTX-Video
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor  # noqa: PLC0415
    except ImportError:
        WanAttention = WanAttnProcessor = ()  # noqa: N806 - an older diffusers without Wan
    patch = getattr(getattr(model, "config", {}), "get", lambda *_: None)("patch_size") or 1
    if isinstance(patch, (tuple, list)):  # (t, h, w) of a video model (Wan): the spatial patch
        patch = patch[-1]
    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(_original(module.processor)) is JointAttnProcessor2_0:
            original, supported, kind = _original(module.processor), (JointAttnProcessor2_0,), "joint"
            processor_cls = DiffrtJointProcessor
            head_dim = module.to_q.out_features // module.heads
        elif isinstance(module, Attention):
            original, supported, kind = _original(module.processor), (AttnProcessor, AttnProcessor2_0), (
                "cross" if module.is_cross_attention else "self")
            processor_cls = DiffrtProcessor
            head_dim = module.to_q.out_features // module.heads
        elif FluxAttention and isinstance(module, FluxAttention):
            original, supported, kind = _original(module.processor), (FluxAttnProcessor,), (
                "joint" if module.added_kv_proj_dim is not None else "self")
            processor_cls = DiffrtFluxProcessor
            head_dim = module.head_dim
        elif LTXAttention and isinstance(module, LTXAttention):
            original, supported, kind = _original(module.processor), (LTXVideoAttnProcessor,), (
                "self" if name.rsplit(".", 1)[-1] == "attn1" else "cross")
            processor_cls = DiffrtLTXProcessor
            head_dim = module.head_dim
        elif WanAttention and isinstance(module, WanAttention):
            original, supported, kind = _original(module.processor), (WanAttnProcessor,), (
                "cross" if module.is_cross_attention else "self")
            processor_cls = DiffrtWanProcessor
            head_dim = module.inner_dim // module.heads
        else:
            continue
        if type(original) not in supported:  # exactly these: a subclass may compute something else
            raise ValueError(f"{name}: attention processor {type(original).__name__} is not one diffrt reproduces "
                             f"({', '.join(c.__name__ for c in supported)}); restore the default processor first")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dim {head_dim} > {MAX_HEAD_DIM}, which the attention kernel does not serve")
        layer = Layer(name, kind, module.heads, head_dim, int(patch))
        module.set_processor(processor_cls(original, layer))
        layers.append(layer)
    return layers
