"""Denoiser wrappers for diffusers models and plain modules; schedules from scheduler configs."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, Transformer2DModel,
                       UNet2DConditionModel)

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from parity import ToyModel, diffusers_trajectory, rel_err, tiny_unet

SCHEDULES = [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="linear", rescale_betas_zero_snr=True),
             dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())]


@pytest.mark.parametrize("config", SCHEDULES)
def test_schedule_matches_diffusers(config):
    ref = DDIMScheduler(**config)
    ours = NoiseSchedule.from_config(ref.config)
    assert ours.kind == "vp" and ours.num_train_timesteps == 1000
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_schedule_rejects_unknown():
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({"prediction_type": "score"})


def tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_dit(cls=DiTTransformer2DModel, **extra):
    torch.manual_seed(0)
    return cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
               sample_size=8, patch_size=2, num_embeds_ada_norm=1000, **extra).eval()


def test_unet2d_condition_parity_with_guidance():
    unet = tiny_cond_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          prediction_type="v_prediction")
    den = Denoiser.from_diffusers(unet, sched.config)
    assert den.prediction_type == "v_prediction" and den.sample_shape == (4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text, neg = torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    def fn(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    with torch.no_grad():
        ref = diffusers_trajectory(sched, fn, noise, 6, text, neg, 4.0)
        out = Sampler.from_scheduler(unet, DDIMScheduler(**sched.config), 6, guidance_scale=4.0).sample(
            noise, cond=text, uncond=neg)
    assert rel_err(out, ref[-1]) <= 1e-5


@pytest.mark.parametrize("cls,extra", [(DiTTransformer2DModel, {}),
                                       (Transformer2DModel, {"norm_type": "ada_norm_zero"})])
def test_dit_learned_sigma_is_split(cls, extra):
    dit = tiny_dit(cls, **extra)
    den = Denoiser.from_diffusers(dit, DDPMScheduler().config)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = den(x, t, y)
        full = dit(x, timestep=t, class_labels=y).sample
    assert out.shape == x.shape
    assert torch.equal(out, full[:, :4])


def test_dit_sampler_parity():
    dit = tiny_dit()
    sched = DDIMScheduler(clip_sample=False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])

    def fn(x, t, c):
        return dit(x, timestep=t.reshape(-1).expand(x.shape[0]), class_labels=c).sample[:, :4]

    with torch.no_grad():
        ref = diffusers_trajectory(sched, fn, noise, 5, y)
        out = Sampler.from_scheduler(dit, DDIMScheduler(**sched.config), 5).sample(noise, cond=y)
    assert rel_err(out, ref[-1]) <= 1e-5


def test_plain_module_and_custom_call():
    sched = NoiseSchedule.linear()
    den = Denoiser(ToyModel(), sched, sample_shape=(3, 8, 8))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    assert torch.equal(den(x, t), ToyModel()(x, t))
    calls = []

    def call(model, x, t, cond):
        calls.append(cond)
        return model(x, t, cond)

    den = Denoiser(ToyModel(), sched, call=call)
    den(x, t, torch.tensor([1, 2]))
    assert len(calls) == 1


def test_bad_models():
    with pytest.raises(TypeError, match="not a supported diffusers model"):
        Denoiser.from_diffusers(torch.nn.Linear(2, 2), DDPMScheduler().config)
    with pytest.raises(TypeError, match="callable"):
        Denoiser(3, NoiseSchedule.linear())
    with pytest.raises(TypeError, match="NoiseSchedule"):
        Denoiser(ToyModel(), {"beta_schedule": "linear"})
    den = Denoiser(lambda x, t: x[:, :1], NoiseSchedule.linear())
    with pytest.raises(RuntimeError, match="sample's shape"):
        den(torch.randn(1, 3, 4, 4), torch.tensor([1.0]))


def test_unet2d_class_conditional_wrapper():
    unet = tiny_unet()
    den = Denoiser.from_diffusers(unet, DDPMScheduler().config)
    assert den.sample_shape == (3, 8, 8) and den.dtype == torch.float32
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 6.0]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(den(x, t, y), unet(x, t, class_labels=y).sample)
