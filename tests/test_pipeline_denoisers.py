"""Denoiser.from_diffusers on the pipelines' own models, sampled by diffrt's Sampler with the conditions the
pipeline would build (SDXL added conditions, PixArt's padded text mask, SD3 pooled projections, Flux packing,
ids, guidance, its own sigmas and dynamic shift): the samples equal the pipeline's (fp32, <= 1e-5)."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffrt.runtime import Denoiser, Sampler  # noqa: E402
from diffrt.runtime.diffusers_models import flux_pack, flux_unpack  # noqa: E402
from diffrt.bench.pipelines import build_dit, build_flux, build_pixart, build_sd3, build_sdxl, relative_error  # noqa: E402

TOL = 1e-5
LATENT = 16  # 32 pixels through the tiny VAE (scale factor 2)


def _noise(channels: int, seed: int = 5, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _fresh(scheduler):
    return type(scheduler).from_config(scheduler.config)


def test_sdxl_added_conditions():
    pipe, kwargs = build_sdxl()
    noise = _noise(4)
    reference = pipe(**kwargs, latents=noise).images
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])  # original size, crop, target size
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "text_embeds": kwargs["pooled_prompt_embeds"],
            "time_ids": time_ids}
    uncond = {"encoder_hidden_states": kwargs["negative_prompt_embeds"],
              "text_embeds": kwargs["negative_pooled_prompt_embeds"], "time_ids": time_ids}
    den = Denoiser.from_diffusers(pipe.unet, pipe.scheduler.config)
    sampler = Sampler.from_scheduler(den, _fresh(pipe.scheduler), kwargs["num_inference_steps"],
                                     guidance_scale=kwargs["guidance_scale"])
    with torch.no_grad():
        ours = sampler.sample(noise, cond=cond, uncond=uncond)
    assert relative_error(ours, reference) <= TOL


def test_sdxl_without_added_conditions_says_what_it_needs():
    pipe, kwargs = build_sdxl()
    den = Denoiser.from_diffusers(pipe.unet, pipe.scheduler.config)
    with pytest.raises(ValueError, match="text_embeds"):
        den(_noise(4), torch.tensor([500.0]), kwargs["prompt_embeds"])


def test_pixart_padded_text_mask_is_kept():
    pipe, kwargs = build_pixart()
    noise = _noise(4)
    reference = pipe(**kwargs, latents=noise).images
    den = Denoiser.from_diffusers(pipe.transformer, pipe.scheduler.config)
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "encoder_attention_mask": kwargs["prompt_attention_mask"]}
    uncond = {"encoder_hidden_states": kwargs["negative_prompt_embeds"],
              "encoder_attention_mask": kwargs["negative_prompt_attention_mask"]}
    sampler = Sampler.from_scheduler(den, _fresh(pipe.scheduler), kwargs["num_inference_steps"],
                                     guidance_scale=kwargs["guidance_scale"])
    with torch.no_grad():
        ours = sampler.sample(noise, cond=cond, uncond=uncond)
        unmasked = sampler.sample(noise, cond=kwargs["prompt_embeds"], uncond=kwargs["negative_prompt_embeds"])
    assert relative_error(ours, reference) <= TOL
    assert relative_error(unmasked, reference) > 1e-3  # the mask matters: dropping it is not the pipeline


def test_dit_learned_sigma_and_class_labels():
    pipe, kwargs = build_dit()
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images  # DiTPipeline always decodes
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)  # DiTPipeline draws its own latents first
    den = Denoiser.from_diffusers(pipe.transformer, pipe.scheduler.config)
    sampler = Sampler.from_scheduler(den, _fresh(pipe.scheduler), kwargs["num_inference_steps"],
                                     guidance_scale=kwargs["guidance_scale"])
    labels = torch.tensor(kwargs["class_labels"])
    with torch.no_grad():
        ours = sampler.sample(latents, cond=labels, uncond=torch.full_like(labels, 1000))
        images = pipe.vae.decode(ours / pipe.vae.config.scaling_factor).sample
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert relative_error(images, reference) <= TOL


def test_sd3_pooled_projections():
    pipe, kwargs = build_sd3()
    noise = _noise(4)
    reference = pipe(**kwargs, latents=noise).images
    den = Denoiser.from_diffusers(pipe.transformer, pipe.scheduler.config)
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "pooled_projections": kwargs["pooled_prompt_embeds"]}
    uncond = {"encoder_hidden_states": kwargs["negative_prompt_embeds"],
              "pooled_projections": kwargs["negative_pooled_prompt_embeds"]}
    sampler = Sampler.from_scheduler(den, _fresh(pipe.scheduler), kwargs["num_inference_steps"],
                                     guidance_scale=kwargs["guidance_scale"])
    with torch.no_grad():
        ours = sampler.sample(noise, cond=cond, uncond=uncond)
    assert relative_error(ours, reference) <= TOL


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_flux_packing_ids_guidance_sigmas_and_shift(dev):
    pipe, kwargs = build_flux(dev=dev)
    steps = kwargs["num_inference_steps"]
    noise = _noise(4)
    reference = flux_unpack(pipe(**kwargs, latents=flux_pack(noise)).images, LATENT, LATENT)
    den = Denoiser.from_diffusers(pipe.transformer, pipe.scheduler.config)
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "pooled_projections": kwargs["pooled_prompt_embeds"]}
    options = {"sigmas": np.linspace(1.0, 1 / steps, steps)}  # what FluxPipeline passes
    if dev:
        cond["guidance"] = torch.full((1,), kwargs["guidance_scale"])
        config = pipe.scheduler.config
        tokens = (LATENT // 2) ** 2  # the packed sequence length sets FLUX.1-dev's shift
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        options["mu"] = tokens * slope + config.base_shift - slope * config.base_image_seq_len
    sampler = Sampler.from_scheduler(den, _fresh(pipe.scheduler), steps, **options)
    with torch.no_grad():
        ours = sampler.sample(noise, cond=cond)
    assert relative_error(ours, reference) <= TOL


def test_flux_guidance_distilled_model_needs_guidance():
    pipe, kwargs = build_flux(dev=True)
    den = Denoiser.from_diffusers(pipe.transformer, pipe.scheduler.config)
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "pooled_projections": kwargs["pooled_prompt_embeds"]}
    with pytest.raises(ValueError, match="guidance"):
        den(_noise(4), torch.tensor([500.0]), cond)


def test_conditions_are_cast_to_the_models_dtype():
    pipe, kwargs = build_sd3()
    den = Denoiser.from_diffusers(pipe.transformer.to(torch.bfloat16), pipe.scheduler.config)
    cond = {"encoder_hidden_states": kwargs["prompt_embeds"], "pooled_projections": kwargs["pooled_prompt_embeds"]}
    assert cond["encoder_hidden_states"].dtype == torch.float32
    with torch.no_grad():
        out = den(_noise(4), torch.tensor([500.0]), cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
