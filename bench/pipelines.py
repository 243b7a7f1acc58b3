"""Real diffusers pipeline classes built from tiny random configs (no downloads), with inputs to call them.

Each ``build_<family>()`` returns ``(pipe, kwargs)``: the pipeline (fp32, CPU, progress bars off, its
family's default scheduler) and call arguments (prompt embeddings instead of prompts: no tokenizer can be
downloaded; ``output_type="latent"`` unless the family's test decodes). Seeded: the same call twice builds
the same weights.
"""
from __future__ import annotations

import numpy as np
import torch

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
             "norm_num_groups": 8, "attention_head_dim": 8, "cross_attention_dim": 32,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(7)
    return AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8, latent_channels=latent_channels, in_channels=3,
                         out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd15(img2img: bool = False):
    """StableDiffusion(Img2Img)Pipeline: SD1.5's UNet layout (tiny), PNDM with SD1.5's config."""
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    scheduler = PNDMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, skip_prk_steps=True)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    kwargs = {"prompt_embeds": _embeds(1, 1, 77, 32), "negative_prompt_embeds": _embeds(2, 1, 77, 32),
              "num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "latent"}
    if img2img:
        kwargs.update(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), strength=0.75)
    else:
        kwargs.update(height=32, width=32)
    return _finish(pipe), kwargs


def build_sd_turbo():
    """SD-Turbo style: one step, trailing spacing, no CFG (guidance 0)."""
    from diffusers import EulerDiscreteScheduler

    pipe, kwargs = build_sd15()
    pipe.scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    kwargs.update(num_inference_steps=1, guidance_scale=0.0)
    kwargs.pop("negative_prompt_embeds")
    return pipe, kwargs


def build_sdxl():
    """StableDiffusionXLPipeline: text_time added conditions (pooled embeddings + time ids), Euler (leading)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                                   "projection_class_embeddings_input_dim": 16 + 6 * 8, "use_linear_projection": True}).eval()
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler)
    kwargs = {"prompt_embeds": _embeds(1, 1, 77, 32), "negative_prompt_embeds": _embeds(2, 1, 77, 32),
              "pooled_prompt_embeds": _embeds(3, 1, 16), "negative_pooled_prompt_embeds": _embeds(4, 1, 16),
              "num_inference_steps": 4, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "latent"}
    return _finish(pipe), kwargs


def build_lcm():
    """LatentConsistencyModelPipeline: an LCM-distilled UNet (guidance embedding, time_cond_proj_dim), LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, "time_cond_proj_dim": 16}).eval()
    scheduler = LCMScheduler(**SD_SCHEDULE, set_alpha_to_one=False)
    pipe = LatentConsistencyModelPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    kwargs = {"prompt_embeds": _embeds(1, 1, 77, 32), "num_inference_steps": 4, "guidance_scale": 8.0,
              "height": 32, "width": 32, "output_type": "latent"}
    return _finish(pipe), kwargs


def build_pixart(sigma: bool = False):
    """PixArt-alpha / -sigma: a PixArtTransformer2DModel with a padded text attention mask, DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                           caption_channels=24, norm_num_groups=8).eval()
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=scheduler)
    mask = torch.zeros(1, 12, dtype=torch.long)
    mask[:, :7] = 1  # 7 real tokens, 5 padding
    kwargs = {"prompt_embeds": _embeds(1, 1, 12, 24), "negative_prompt_embeds": _embeds(2, 1, 12, 24),
              "negative_prompt": None, "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone(),
              "num_inference_steps": 4, "guidance_scale": 4.5, "height": 32, "width": 32, "output_type": "latent",
              "use_resolution_binning": False}
    return _finish(pipe), kwargs


def build_dit():
    """DiTPipeline: class-conditional DiT with learned sigma (8 output channels), its default DPM-Solver++ config."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=8).eval()
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler, id2label={i: str(i) for i in range(10)})
    kwargs = {"class_labels": [3, 7], "num_inference_steps": 4, "guidance_scale": 4.0, "output_type": "latent"}
    return _finish(pipe), kwargs


def build_sd3():
    """StableDiffusion3Pipeline: joint attention (MMDiT), pooled projections, FlowMatch Euler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                        caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    kwargs = {"prompt_embeds": _embeds(1, 1, 10, 24), "negative_prompt_embeds": _embeds(2, 1, 10, 24),
              "pooled_prompt_embeds": _embeds(3, 1, 12), "negative_pooled_prompt_embeds": _embeds(4, 1, 12),
              "num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32, "output_type": "latent"}
    return _finish(pipe), kwargs


def build_flux(dev: bool = False):
    """FluxPipeline: packed 2x2 latents, image/text ids, its own sigmas; dev: guidance embedding and dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                         pooled_projection_dim=12, guidance_embeds=dev, axes_dims_rope=(4, 6, 6)).eval()
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(latent_channels=4), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    kwargs = {"prompt_embeds": _embeds(1, 1, 10, 24), "pooled_prompt_embeds": _embeds(3, 1, 12),
              "num_inference_steps": 4 if dev else 2, "guidance_scale": 3.5 if dev else 0.0, "height": 32, "width": 32,
              "output_type": "latent"}
    return _finish(pipe), kwargs


def build_ltx():
    """LTXPipeline (LTX-Video): packed video tokens [B, F*H*W, C], 3-D RoPE, a padded text attention mask, CFG;
    FlowMatch Euler with LTX-Video's config (dynamic exponential shift on the video token count, terminal shift 0.1)."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=2, caption_channels=24).eval()
    torch.manual_seed(7)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8,) * 4,
                                decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
                                decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1).eval()  # 4x space, 4x time
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    mask = torch.zeros(1, 12, dtype=torch.long)
    mask[:, :7] = 1  # 7 real tokens, 5 padding
    kwargs = {"prompt_embeds": _embeds(1, 1, 12, 24), "negative_prompt_embeds": _embeds(2, 1, 12, 24),
              "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask.clone(),
              "num_inference_steps": 3, "guidance_scale": 3.0, "height": 32, "width": 32, "num_frames": 9,
              "output_type": "latent"}
    return _finish(pipe), kwargs


# Wan2.1-T2V's scheduler config (WanPipeline's docs: flow_shift 3.0 for 480p, 5.0 for 720p)
WAN_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "solver_order": 2, "prediction_type": "flow_prediction", "predict_x0": True, "solver_type": "bh2",
                "lower_order_final": True, "use_flow_sigmas": True, "flow_shift": 3.0, "timestep_spacing": "linspace",
                "final_sigmas_type": "zero"}


def build_wan():
    """WanPipeline (Wan 2.1 text-to-video): a WanTransformer3DModel (3-D patches, Wan's RoPE, q/k RMSNorm across
    heads), AutoencoderKLWan (4x time, 8x space), UniPC on flow sigmas (Wan's config: flow_prediction, flow_shift 3),
    CFG with negative prompt embeddings."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=24, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    torch.manual_seed(7)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(**WAN_SCHEDULE))
    kwargs = {"prompt_embeds": _embeds(1, 1, 12, 24), "negative_prompt_embeds": _embeds(2, 1, 12, 24),
              "num_inference_steps": 4, "guidance_scale": 5.0, "height": 32, "width": 32, "num_frames": 9,
              "output_type": "latent"}
    return _finish(pipe), kwargs


FAMILIES = {"sd15": build_sd15, "sd15-img2img": lambda: build_sd15(img2img=True), "sd-turbo": build_sd_turbo,
            "sdxl": build_sdxl, "lcm": build_lcm, "pixart-alpha": build_pixart,
            "pixart-sigma": lambda: build_pixart(sigma=True), "dit": build_dit, "sd3": build_sd3,
            "flux-schnell": build_flux, "flux-dev": lambda: build_flux(dev=True), "ltx-video": build_ltx,
            "wan": build_wan}


def relative_error(a, b) -> float:
    """max |a - b| / max |b| over the pipeline outputs (latents or images)."""
    a, b = torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a, \
        torch.as_tensor(np.asarray(b)) if not torch.is_tensor(b) else b
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
