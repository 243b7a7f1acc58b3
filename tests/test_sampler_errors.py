"""Bad input to the Sampler gets a clear error; nothing runs on bad input."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from parity import ToyModel


@pytest.fixture
def den():
    return Denoiser(ToyModel(), NoiseSchedule.linear(), sample_shape=(3, 8, 8))


def test_wrong_shape(den):
    with pytest.raises(ValueError, match=r"sample shape \(3, 4, 4\)"):
        Sampler(den, "ddim", 4).sample(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="B, \\*sample_shape"):
        Sampler(den, "ddim", 4).sample(torch.randn(8))


def test_wrong_dtype(den):
    with pytest.raises(TypeError, match="floating-point"):
        Sampler(den, "ddim", 4).sample(torch.zeros(1, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor"):
        Sampler(den, "ddim", 4).sample([[0.0]])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_noise(den, bad):
    noise = torch.randn(1, 3, 8, 8)
    noise[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        Sampler(den, "ddim", 4).sample(noise)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(den, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        Sampler(den, "ddim", steps)


def test_unknown_solver_and_scheduler(den):
    with pytest.raises(ValueError, match="unknown solver 'ddpm-xyz'"):
        Sampler(den, "ddpm-xyz", 4)
    with pytest.raises(NotImplementedError, match="DDPMScheduler is not supported"):  # PNDM is reproduced now
        Sampler.from_scheduler(den, DDPMScheduler(), 4)


def test_guidance_needs_uncond(den):
    with pytest.raises(ValueError, match="needs uncond"):
        Sampler(den, "ddim", 4, guidance_scale=3.0).sample(torch.randn(1, 3, 8, 8), cond=torch.tensor([1]))
    with pytest.raises(ValueError, match="finite"):
        Sampler(den, "ddim", 4, guidance_scale=math.nan)


def test_unsupported_step_option_named(den):
    with pytest.raises(NotImplementedError, match="variance_noise"):
        Sampler.from_scheduler(den, DDIMScheduler(), 4, variance_noise=torch.zeros(1))


def test_early_exit_without_exit_heads_is_refused(den):
    with pytest.raises(ValueError, match="early_exit needs a model with exit heads"):
        Sampler(den, "ddim", 4, early_exit=0.1)


def test_model_on_other_device_refused():
    den = Denoiser(torch.nn.Linear(2, 2, device="meta"), NoiseSchedule.linear())
    with pytest.raises(ValueError, match="on cpu, the model on meta"):
        Sampler(den, "ddim", 4).sample(torch.randn(1, 2))
