"""The Sampler's step API and preset solvers behave as sample() does."""
import pytest
import torch

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import PRESETS
from parity import ToyModel


def _den(flow: bool = False) -> Denoiser:
    schedule = NoiseSchedule.from_config({"shift": 3.0}) if flow else NoiseSchedule.linear()
    return Denoiser(ToyModel(), schedule, sample_shape=(3, 8, 8))


@pytest.mark.parametrize("solver", sorted(PRESETS))
def test_every_preset_samples_finite_and_deterministic(solver):
    sampler = Sampler(_den(solver.startswith("flow")), solver, 6, guidance_scale=2.0)
    noise = torch.randn(2, 3, 8, 8)
    cond, uncond = torch.tensor([1, 2]), torch.tensor([9, 9])
    a = sampler.sample(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, noise * sampler.plan.init_noise_sigma)


def test_step_api_equals_sample():
    sampler = Sampler(_den(), "dpmpp-2m", 7)
    noise, cond = torch.randn(2, 3, 8, 8), torch.tensor([3, 4])
    expected = sampler.sample(noise, cond=cond)
    state = sampler.start(noise)
    for _ in range(sampler.steps):
        x_in, t = sampler.model_inputs(state)
        assert t.shape == (2,)
        sampler.step(state, sampler.denoiser(x_in, t, cond))
    assert int(state.step) == sampler.steps
    assert torch.equal(state.x, expected)


def test_guidance_folds_like_explicit_cfg():
    """CFG in the table equals running the solver on u + g (c - u) computed outside."""
    den = _den()
    noise, cond, uncond = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([9, 9])
    guided = Sampler(den, "unipc", 6, guidance_scale=3.0).sample(noise, cond=cond, uncond=uncond)
    plain = Sampler(den, "unipc", 6)
    state = plain.start(noise)
    for _ in range(plain.steps):
        x_in, t = plain.model_inputs(state)
        u, c = den(x_in, t, uncond), den(x_in, t, cond)
        plain.step(state, u + 3.0 * (c - u))
    assert ((guided - state.x).abs().max() / state.x.abs().max()).item() < 1e-6


def test_generator_list_draws_per_sample():
    sampler = Sampler(_den(), "euler-ancestral", 4)
    noise = torch.randn(2, 3, 8, 8)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    both = sampler.sample(noise, cond=torch.tensor([0, 0]), generator=gens)
    first = sampler.sample(noise[:1], cond=torch.tensor([0]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(both[:1], first)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sampler.sample(noise, generator=[torch.Generator()] * 3)
