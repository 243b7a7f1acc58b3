"""Step caching (first-block cache): exact at threshold 0, skipping re-adds the cached residual,
the plain denoiser is untouched, UNets are refused."""
import pytest
import torch
from diffrt.runtime import Sampler, models, optimize


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


def _sample(den, steps=10):
    labels = torch.arange(6)
    noise = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return Sampler(den, "dpmpp-2m", steps, guidance_scale=3.0).sample(
        noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))


def test_threshold_zero_is_exact_and_the_plain_model_untouched(dit):
    exact = _sample(dit)
    cached = optimize(dit, step_cache=0.0)
    assert torch.equal(_sample(cached), exact)
    assert cached.step_cache.stats == {"calls": 10, "skipped": 0, "skipped_fraction": 0.0}
    assert torch.equal(_sample(dit), exact)
    assert set(dit.model.state_dict()) == set(models.load("digits-dit").model.state_dict())


def test_a_skipped_call_adds_the_cached_residual(dit):
    fast = optimize(dit, step_cache=1e9)  # skip whenever there is a previous call to compare with
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([500.0, 500.0]), torch.tensor([1, 2])
    fast.reset_cache()
    with torch.no_grad():
        first = fast(x, t, y)
        second = fast(x, t, y)  # the first change is measured here; a call decides on an earlier call's change
        assert fast.step_cache.stats["skipped"] == 0
        third = fast(x, t, y)  # same input: same first block, the rest re-added from the cache
    assert fast.step_cache.stats["skipped"] == 1
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third, first, rtol=1e-5, atol=1e-5)
    fast.reset_cache()
    fast.step_cache.synchronous = True  # decide on the call's own change: the second call skips already
    with torch.no_grad():
        fast(x, t, y)
        second = fast(x, t, y)
    assert fast.step_cache.stats["skipped"] == 2
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
    fast.step_cache.synchronous = False
    with torch.no_grad():
        third = fast(x * 1.5, torch.tensor([100.0, 100.0]), y)
    assert (third - dit(x * 1.5, torch.tensor([100.0, 100.0]), y)).abs().max() > 1e-4  # an approximation


def test_sampling_with_the_cache_saves_blocks(dit):
    fast = optimize(dit, step_cache=0.2)
    samples = _sample(fast, steps=20)
    stats = fast.step_cache.stats
    assert stats["calls"] == 20 and 0 < stats["skipped"] < 20
    assert torch.isfinite(samples).all()
    _sample(fast, steps=20)
    assert fast.step_cache.stats["calls"] == 40  # a new trajectory starts from a reset cache


def test_unets_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="not UNets"):
        optimize(models.load("digits-unet"), step_cache=True)
    with pytest.raises(ValueError, match="non-negative"):
        optimize(models.load("digits-dit"), step_cache=-1)
