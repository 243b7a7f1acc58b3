"""How a :class:`~diffrt.runtime.Denoiser` calls each diffusers model class: ``call(model, x, t, cond) -> prediction``.

``cond`` is a tensor for models with one condition, or a dict of the model's keyword conditions
(:mod:`diffrt.runtime.conditions`), batched like x:

==========================  =========================================================================
UNet2DModel                 class labels [B] (or None)
UNet2DConditionModel        text embeddings [B, L, D], or {"encoder_hidden_states", and for SDXL
                            "text_embeds" [B, P] + "time_ids" [B, 6]; LCM: "timestep_cond" [B, E];
                            optional "encoder_attention_mask"}
DiT / Transformer2D         class labels [B] (DiT) or text embeddings [B, L, D]; learned sigma: the
                            first half of the output channels (the mean) is the prediction
PixArtTransformer2DModel    text embeddings, or {"encoder_hidden_states", "encoder_attention_mask" [B, L]
                            (1 = token, 0 = padding), optional "resolution" / "aspect_ratio"}
SD3Transformer2DModel       {"encoder_hidden_states" [B, L, D], "pooled_projections" [B, P]}
FluxTransformer2DModel      {"encoder_hidden_states" [B, L, D], "pooled_projections" [B, P], optional
                            "guidance" [B] (FLUX.1-dev's guidance scale)}; x is the *unpacked* latent
                            [B, C, H, W]: packed into 2x2 patches with image / text ids as FluxPipeline
                            does, and the timestep divided by 1000
==========================  =========================================================================
"""
from __future__ import annotations

from typing import Any, Callable

import torch

CallFn = Callable[[Any, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _call_unet2d(model, x, t, cond):
    return model(x, t, class_labels=cond).sample


ADDED_CONDITIONS = ("text_embeds", "time_ids", "image_embeds")


def _call_unet2d_condition(model, x, t, cond):
    if cond is None:
        raise ValueError("UNet2DConditionModel needs cond (encoder_hidden_states [B, L, D], or a dict of conditions)")
    if torch.is_tensor(cond):
        cond = {"encoder_hidden_states": cond}
    kwargs = dict(cond)
    added = {k: kwargs.pop(k) for k in ADDED_CONDITIONS if k in kwargs}
    if model.config.get("addition_embed_type") == "text_time" and not {"text_embeds", "time_ids"} <= set(added):
        raise ValueError("this UNet (SDXL) takes added conditions: cond={'encoder_hidden_states': [B, L, D], "
                         "'text_embeds': [B, pooled], 'time_ids': [B, 6]}")
    return model(x, t, added_cond_kwargs=added or None, **kwargs).sample


def _keep_mean(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A learned-sigma model's output [B, 2C, ...]: the first C channels (the mean)."""
    channels = x.shape[1]
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def _call_transformer2d(model, x, t, cond):
    if isinstance(cond, dict):
        out = model(x, timestep=t, **cond).sample
    elif torch.is_tensor(cond) and cond.dim() == 3:
        out = model(x, timestep=t, encoder_hidden_states=cond).sample
    else:
        out = model(x, timestep=t, class_labels=cond).sample
    return _keep_mean(out, x)


def _call_pixart(model, x, t, cond):
    if torch.is_tensor(cond):
        cond = {"encoder_hidden_states": cond}
    kwargs = dict(cond)
    added = {"resolution": kwargs.pop("resolution", None), "aspect_ratio": kwargs.pop("aspect_ratio", None)}
    return _keep_mean(model(x, timestep=t, added_cond_kwargs=added, **kwargs).sample, x)


def _call_sd3(model, x, t, cond):
    if not isinstance(cond, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(cond):
        raise ValueError("SD3Transformer2DModel takes cond={'encoder_hidden_states': [B, L, D], "
                         "'pooled_projections': [B, P]}")
    return model(hidden_states=x, timestep=t, **cond).sample


def flux_pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], FluxPipeline's _pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def flux_unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W], FluxPipeline's _unpack_latents."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, col) of each 2x2 patch, [(H/2)(W/2), 3], FluxPipeline's _prepare_latent_image_ids."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _call_flux(model, x, t, cond):
    if not isinstance(cond, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(cond):
        raise ValueError("FluxTransformer2DModel takes cond={'encoder_hidden_states': [B, L, D], "
                         "'pooled_projections': [B, P]} (and 'guidance' [B] for guidance-distilled models)")
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Flux samples are unpacked latents [B, C, H, W] with even H and W, got {tuple(x.shape)}")
    kwargs = dict(cond)
    text = kwargs["encoder_hidden_states"]
    if model.config.get("guidance_embeds") and kwargs.get("guidance") is None:
        raise ValueError("this Flux transformer is guidance-distilled: give cond['guidance'] (the guidance scale, [B])")
    if not model.config.get("guidance_embeds"):
        kwargs.pop("guidance", None)
    height, width = x.shape[-2:]
    out = model(hidden_states=flux_pack(x), timestep=t / 1000, img_ids=flux_image_ids(height, width, x.device, x.dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype), **kwargs).sample
    return flux_unpack(out, height, width)


def call_module(model, x, t, cond):
    """The default convention of a plain callable: model(x, t) or model(x, t, cond)."""
    return model(x, t) if cond is None else model(x, t, cond)


DIFFUSERS_CALLS: dict[str, CallFn] = {
    "UNet2DModel": _call_unet2d,
    "UNet2DConditionModel": _call_unet2d_condition,
    "DiTTransformer2DModel": _call_transformer2d,
    "Transformer2DModel": _call_transformer2d,
    "PixArtTransformer2DModel": _call_pixart,
    "SD3Transformer2DModel": _call_sd3,
    "FluxTransformer2DModel": _call_flux,
}


def sample_shape(model: Any) -> tuple[int, ...] | None:
    """(C, H, W) of one sample from the model's config (None where the config does not say)."""
    cfg = getattr(model, "config", {})
    size, channels = cfg.get("sample_size"), cfg.get("in_channels")
    if type(model).__name__ == "FluxTransformer2DModel" or size is None or channels is None:
        return None  # Flux's size is the pipeline's choice
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, *size)


def class_count(model: Any) -> int | None:
    """How many class labels a class-conditional model embeds (its null class included), or None."""
    cfg = getattr(model, "config", {})
    name = type(model).__name__
    if name == "UNet2DModel":
        return cfg.get("num_class_embeds")
    if name in ("DiTTransformer2DModel", "Transformer2DModel") and cfg.get("num_embeds_ada_norm") \
            and not cfg.get("cross_attention_dim"):
        return int(cfg["num_embeds_ada_norm"]) + 1  # + the learned null class of classifier-free guidance
    return None
