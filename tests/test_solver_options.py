"""Scheduler options as diffusers takes them: each class's options are its diffusers signature, keys another
scheduler left in a config (``X.from_config(other.config)``) are ignored as diffusers ignores them, a
misspelled option is refused by every solver, and a preset takes the model's own scheduler options."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler  # noqa: E402
from diffrt.runtime.solvers import OPTIONS, PRESETS, plan_for, plan_from_scheduler  # noqa: E402
from parity import ToyModel, check_scheduler_parity, diffusers_trajectory, rel_err, toy_fn  # noqa: E402

# Stable Diffusion 1.5's scheduler config as its pipeline ships it (PNDM's keys included)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}


@pytest.mark.parametrize("scheduler_class", sorted(OPTIONS))
def test_options_are_the_diffusers_signature(scheduler_class):
    parameters = inspect.signature(getattr(diffusers, scheduler_class).__init__).parameters
    assert set(OPTIONS[scheduler_class]) == set(parameters) - {"self"}


@pytest.mark.parametrize("solver", sorted(PRESETS))
def test_every_preset_refuses_a_misspelled_option(solver):
    schedule = NoiseSchedule.from_config(dict(SD15))
    with pytest.raises(TypeError, match="use_karas_sigmas"):
        plan_for(solver, schedule, 4, use_karas_sigmas=True)


def test_a_misspelling_gets_a_suggestion():
    with pytest.raises(TypeError, match="did you mean 'use_karras_sigmas'"):
        plan_for("dpmpp-2m", NoiseSchedule.from_config(dict(SD15)), 4, use_karras_sigma=True)


SWAPS = ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "DDIMScheduler", "LCMScheduler"]


@pytest.mark.parametrize("target", SWAPS)
def test_from_config_of_another_scheduler_reproduces_diffusers(target):
    """pipe.scheduler = X.from_config(pipe.scheduler.config): X keeps PNDM's keys in .config and ignores them."""
    cls = getattr(diffusers, target)
    swapped = cls.from_config(dict(SD15))
    assert "skip_prk_steps" in swapped.config  # diffusers keeps the foreign key ...
    check_scheduler_parity(lambda: cls.from_config(dict(SD15)), 4,
                           stochastic=target in ("EulerAncestralDiscreteScheduler", "LCMScheduler"))


def test_karras_dpm_from_an_sd_config():
    make = lambda: diffusers.DPMSolverMultistepScheduler.from_config(dict(SD15), use_karras_sigmas=True,  # noqa: E731
                                                                     algorithm_type="sde-dpmsolver++")
    check_scheduler_parity(make, 5, stochastic=True)


def test_preset_takes_the_models_scheduler_options():
    """Sampler(den, "ddim") on an SD model uses its config's clip_sample / set_alpha_to_one / steps_offset, as
    DDIMScheduler.from_config(model's config) does (it used DDIM's defaults: x0 clipped to +-1)."""
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(dict(SD15)), sample_shape=(3, 8, 8))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    cond = torch.arange(2)
    with torch.no_grad():
        reference = diffusers_trajectory(diffusers.DDIMScheduler.from_config(dict(SD15)), toy_fn, noise, 6, cond)[-1]
        ours = Sampler(den, "ddim", 6).sample(noise, cond=cond)
        clipped = Sampler(den, "ddim", 6, clip_sample=True).sample(noise, cond=cond)  # the caller overrides it
    assert rel_err(ours, reference) <= 1e-5
    assert rel_err(clipped, reference) > 1e-3


def test_an_unknown_option_of_a_newer_diffusers_is_refused_when_set():
    class Newer(diffusers.DDIMScheduler):
        @diffusers.configuration_utils.register_to_config
        def __init__(self, new_knob: float = 0.0, **kwargs):
            super().__init__(**kwargs)

    Newer.__name__ = "DDIMScheduler"
    assert plan_from_scheduler(Newer(), 4).steps == 4  # at its default it changes nothing
    with pytest.raises(NotImplementedError, match="new_knob"):
        plan_from_scheduler(Newer(new_knob=1.0), 4)
