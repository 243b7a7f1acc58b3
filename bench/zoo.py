"""Benchmark workloads: the real architectures' shapes (random weights) and the shipped reference models.

``workload(name, device, resolution=None)`` -> :class:`Workload`: an fp32 :class:`Denoiser` on the
device, how to make its conditions, the unconditional conditions of CFG, the default solver,
steps and guidance, and the diffusers scheduler config its baseline loop uses. Speed does not
depend on the weights' values, so the large models are built from their published configs with
random (seeded) weights; quality deltas on them compare two runs of the same random model.

=================  ==========================================================================
sd15-unet          Stable Diffusion 1.5 UNet (860M), 512^2 -> 64^2 latents, CLIP-L text 77x768,
                   DPM-Solver++(2M) 20 steps, CFG 7.5
sdxl-unet          SDXL base UNet (2.6B), 1024^2 -> 128^2 latents, text 77x2048 + pooled 1280 +
                   time ids, 20 steps, CFG 5
dit-xl-2           DiT-XL/2 (675M), 256^2 -> 32^2 latents, classes 0-999, 20 steps, CFG 4
flux-like          Flux's width (24 heads x 128, joint text 512x4096) at a reduced depth (4 double
                   + 8 single blocks), 1024^2 -> 64^2 packed tokens, flow Euler 20 steps, no CFG
sd-turbo-stream    SD-Turbo's UNet (SD 2.1 shape), 512^2, one step, no CFG (StreamDiffusion's
                   txt2img case; the VAE and the frame queue are in bench/bench_stream.py)
lipsync            a FlashLips-sized one-step editor UNet (85M): noisy mouth latent + masked
                   frame, reference and pose (20 channels) -> latent, 256^2, one step
digits-dit         the shipped reference DiT (with exit heads), 16^2 pixels, 20 steps, CFG 3
digits-unet        the shipped reference UNet, 16^2 pixels, 20 steps, CFG 3
<folder>           a diffusers model folder (config.json + scheduler config)
=================  ==========================================================================

The text-conditioned SDXL and Flux calls take extra inputs (pooled embeddings, time ids, token
ids); their condition is packed into one tensor ([B, L + 1, D], the last row holding the pooled
vector) so that CFG concatenates it like any embedding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from diffrt.runtime.denoiser import Denoiser

log = logging.getLogger(__name__)

SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "prediction_type": "epsilon", "clip_sample": False}
FLOW_SCHEDULE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TURBO_SCHEDULE = {**SD_SCHEDULE, "timestep_spacing": "trailing"}


@dataclass
class Workload:
    """One model to benchmark and the sampling it is benchmarked with.

    ``make_cond(batch, seed)`` / ``make_uncond(batch)`` give device tensors (``make_uncond`` is
    None without CFG). ``data_range`` is the span PSNR is taken over (2 for the pixel models;
    None: the reference output's peak-to-peak). ``todo_tokens`` / ``sparse_tokens``: the token
    count from which the ToDo / sparse configurations apply (smaller for the 16^2 models);
    ``todo_level``: the finest token grid with self-attention (0: the sample's own grid, 1: half of it).
    """

    name: str
    den: Denoiser
    make_cond: Callable[[int, int], Any]
    make_uncond: Callable[[int], Any] | None
    solver: str = "dpmpp-2m"
    steps: int = 20
    guidance_scale: float | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None
    data_range: float | None = None
    todo_tokens: int = 4096
    todo_level: int = 0
    sparse_tokens: int = 1024
    sparse_block: int = 64
    description: str = ""

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.make_uncond is not None

    def noise(self, batch: int, seed: int) -> torch.Tensor:
        """Unit Gaussian noise [batch, *sample_shape] from a CPU generator (the same on every device)."""
        noise = torch.randn(batch, *self.den.sample_shape, generator=torch.Generator().manual_seed(seed))
        return noise.to(self.den.device or "cpu")

    def summary(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.den.model.parameters()) if hasattr(self.den.model, "parameters") else None
        return {"model": self.name, "description": self.description, "parameters": params,
                "sample_shape": list(self.den.sample_shape), "resolution": self.resolution, "solver": self.solver,
                "steps": self.steps, "guidance_scale": self.guidance_scale}


NAMES = ("sd15-unet", "sdxl-unet", "dit-xl-2", "flux-like", "sd-turbo-stream", "lipsync", "digits-dit", "digits-unet")


def workload(name: str, device: str | torch.device = "cpu", resolution: int | None = None, seed: int = 0,
             tiny: bool = False) -> Workload:
    """Build the named workload (module docstring) on ``device`` in fp32; ``resolution`` in pixels.

    ``tiny``: the same architecture family and call convention at toy widths and depths, 64^2
    pixels by default (CPU smoke tests of the whole path; not a speed measurement).
    """
    device = torch.device(device)
    if name in ("digits-dit", "digits-unet"):
        return _digits(name, device, resolution)
    builders = {"sd15-unet": _sd15, "sdxl-unet": _sdxl, "dit-xl-2": _dit_xl, "flux-like": _flux_like,
                "sd-turbo-stream": _sd_turbo, "lipsync": _lipsync}
    if name in builders:
        torch.manual_seed(seed)
        built = builders[name](device, 64 if resolution is None and tiny else resolution, tiny)
        if tiny:
            built.description = f"tiny {built.name} (toy widths, same call convention)"
        return built
    if Path(name).is_dir():
        return _folder(Path(name), device, resolution)
    raise ValueError(f"unknown model {name!r}: one of {', '.join(NAMES)}, or a diffusers model folder")


def _latent(resolution: int | None, default: int, factor: int = 8, multiple: int = 1) -> tuple[int, int]:
    pixels = default if resolution is None else resolution
    if pixels <= 0 or pixels % (factor * multiple):
        raise ValueError(f"resolution {pixels} must be a positive multiple of {factor * multiple} for this model")
    return pixels, pixels // factor


def _randn(device: torch.device, *shape: int) -> Callable[[int, int], torch.Tensor]:
    def make(batch: int, seed: int) -> torch.Tensor:
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return make


def _digits(name: str, device: torch.device, resolution: int | None) -> Workload:
    from diffrt.runtime import models  # noqa: PLC0415

    if resolution not in (None, 16):
        raise ValueError(f"{name} samples 16x16 pixels; --resolution {resolution} is not possible")
    den = models.load(name, device=device)
    card = models.card(name)
    return Workload(name, den, lambda batch, seed: (torch.arange(batch) % 10).to(device),
                    lambda batch: torch.full((batch,), models.NULL_CLASS, device=device), guidance_scale=3.0,
                    scheduler_config=dict(card["scheduler"]), resolution=16, data_range=2.0, todo_tokens=0,
                    todo_level=1 if name == "digits-unet" else 0,
                    sparse_tokens=0, sparse_block=16, description="shipped reference model")


TINY_UNET = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def _unet_condition(config: dict[str, Any], device: torch.device, tiny: bool):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    if tiny:
        config = {**config, **TINY_UNET, "cross_attention_dim": 32}
        config.pop("transformer_layers_per_block", None)
    return UNet2DConditionModel(**config).to(device).eval()


def _sd15(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    pixels, latent = _latent(resolution, 512)
    unet = _unet_condition({"sample_size": latent, "cross_attention_dim": 768}, device, tiny)
    den = Denoiser.from_diffusers(unet, SD_SCHEDULE)
    text = _randn(device, 77, unet.config.cross_attention_dim)
    return Workload("sd15-unet", den, text, lambda batch: text(batch, 10**6), guidance_scale=7.5,
                    scheduler_config=SD_SCHEDULE, resolution=pixels, todo_tokens=0 if tiny else 4096,
                    description="SD1.5 UNet shape, random weights")


def _sd_turbo(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    pixels, latent = _latent(resolution, 512)
    unet = _unet_condition({"sample_size": latent, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                            "use_linear_projection": True}, device, tiny)
    den = Denoiser.from_diffusers(unet, TURBO_SCHEDULE)
    return Workload("sd-turbo-stream", den, _randn(device, 77, unet.config.cross_attention_dim), None, solver="euler",
                    steps=1, scheduler_config=TURBO_SCHEDULE, resolution=pixels,
                    description="SD-Turbo UNet shape (SD 2.1), random weights, one step")


def _sdxl(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    pixels, latent = _latent(resolution, 1024)
    pooled, time_dim = (16, 8) if tiny else (1280, 256)
    unet = _unet_condition({
        "sample_size": latent, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": pooled + 6 * time_dim}, device, tiny)
    width = unet.config.cross_attention_dim

    def call(model, x, t, cond):
        text, extra = cond[:, :-1], cond[:, -1]
        added = {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled:pooled + 6]}
        return model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

    text = _randn(device, 77, width)
    time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=torch.float32, device=device)

    def make(batch: int, seed: int) -> torch.Tensor:
        cond = torch.cat([text(batch, seed), torch.zeros(batch, 1, width, device=device)], 1)
        cond[:, -1, :pooled] = torch.randn(batch, pooled, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        cond[:, -1, pooled:pooled + 6] = time_ids
        return cond

    den = Denoiser(unet, _schedule(SD_SCHEDULE), sample_shape=(4, latent, latent), call=call)
    return Workload("sdxl-unet", den, make, lambda batch: make(batch, 10**6), guidance_scale=5.0,
                    scheduler_config=SD_SCHEDULE, resolution=pixels, todo_tokens=0 if tiny else 4096,
                    todo_level=0 if tiny else 1, description="SDXL base UNet shape, random weights")


def _dit_xl(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    from diffusers import DiTTransformer2DModel  # noqa: PLC0415

    pixels, latent = _latent(resolution, 256, multiple=2)
    layers, heads, head_dim = (2, 2, 8) if tiny else (28, 16, 72)
    model = DiTTransformer2DModel(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                                  sample_size=latent, patch_size=2, in_channels=4, out_channels=8,
                                  num_embeds_ada_norm=1000)
    den = Denoiser.from_diffusers(model.to(device).eval(), DIT_SCHEDULE)
    return Workload("dit-xl-2", den, lambda batch, seed: ((torch.arange(batch) * 97 + seed) % 1000).to(device),
                    lambda batch: torch.full((batch,), 1000, device=device), guidance_scale=4.0,
                    scheduler_config=DIT_SCHEDULE, resolution=pixels, todo_tokens=0 if tiny else 1024,
                    sparse_tokens=0 if tiny else 1024, sparse_block=16 if tiny else 64,
                    description="DiT-XL/2 shape, random weights")


def _flux_like(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    from diffusers import FluxTransformer2DModel  # noqa: PLC0415

    pixels, latent = _latent(resolution, 1024, multiple=2)
    if tiny:
        sizes = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                 "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6)}
        text_tokens = 8
    else:
        sizes = {"num_layers": 4, "num_single_layers": 8, "attention_head_dim": 128, "num_attention_heads": 24,
                 "joint_attention_dim": 4096, "pooled_projection_dim": 768}
        text_tokens = 512
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=False, **sizes).to(device).eval()
    side, pooled = latent // 2, sizes["pooled_projection_dim"]
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    img_ids, txt_ids = ids.reshape(-1, 3), torch.zeros(text_tokens, 3, device=device)

    def call(model, x, t, cond):
        b, c = x.shape[:2]
        packed = x.reshape(b, c, side, 2, side, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, c * 4)
        out = model(hidden_states=packed, encoder_hidden_states=cond[:, :-1], pooled_projections=cond[:, -1, :pooled],
                    timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids).sample
        return out.reshape(b, side, side, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)

    text = _randn(device, text_tokens + 1, sizes["joint_attention_dim"])
    den = Denoiser(model, _schedule(FLOW_SCHEDULE), sample_shape=(16, latent, latent), call=call)
    return Workload("flux-like", den, text, None, solver="flow-euler", scheduler_config=FLOW_SCHEDULE,
                    resolution=pixels, todo_tokens=0 if tiny else 4096, sparse_tokens=0 if tiny else 1024,
                    sparse_block=16 if tiny else 64,
                    description="Flux width (24x128 heads), 4 double + 8 single blocks, random weights")


def _lipsync(device: torch.device, resolution: int | None, tiny: bool) -> Workload:
    from diffusers import UNet2DModel  # noqa: PLC0415

    pixels, latent = _latent(resolution, 256)
    channels = (16, 32) if tiny else (128, 256, 384, 512)
    editor = UNet2DModel(sample_size=latent, in_channels=24, out_channels=4, layers_per_block=1 if tiny else 2,
                         block_out_channels=channels, norm_num_groups=8 if tiny else 32,
                         down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
                         up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1)).to(device).eval()
    schedule = {**TURBO_SCHEDULE, "prediction_type": "sample"}
    den = Denoiser(editor, _schedule(schedule), sample_shape=(4, latent, latent),
                   call=lambda model, x, t, cond: model(torch.cat([x, cond.to(x.dtype)], 1), t).sample)
    return Workload("lipsync", den, _randn(device, 20, latent, latent), None, solver="ddim", steps=1,
                    scheduler_config=schedule, resolution=pixels,
                    description="FlashLips-sized one-step editor UNet, random weights")


def _folder(folder: Path, device: torch.device, resolution: int | None) -> Workload:
    from diffrt.runtime import models  # noqa: PLC0415

    den = models.load_model(folder)
    den.model.to(device)
    den.device = device
    config = getattr(den.model, "config", {})
    if resolution is not None:
        raise ValueError(f"--resolution is not supported for a model folder ({folder}): it samples at its config's size")
    if config.get("cross_attention_dim"):
        make = _randn(device, 77, int(config["cross_attention_dim"]))
        return Workload(folder.name, den, make, lambda batch: make(batch, 10**6), guidance_scale=7.5,
                        scheduler_config=dict(den.schedule.config or {}), description=f"diffusers model folder {folder}")
    classes = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
    make = (lambda batch, seed: ((torch.arange(batch) + seed) % classes).to(device)) if classes else (lambda b, s: None)
    return Workload(folder.name, den, make, None, scheduler_config=dict(den.schedule.config or {}),
                    description=f"diffusers model folder {folder}")


def _schedule(config: dict[str, Any]):
    from diffrt.runtime.schedule import NoiseSchedule  # noqa: PLC0415

    return NoiseSchedule.from_config(config)
