"""LinearAG: the fit recovers an exact linear relation, the estimated steps then reproduce plain CFG,
the evaluations saved are counted, the coefficients round-trip and refuse another plan, and on the
reference DiT the estimate is closer to the true unconditional prediction than AG's fallback (cond)."""
from __future__ import annotations

import pytest
import torch
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler, models
from diffrt.runtime.linear_ag import LinearAG, default_estimated_steps, fit_linear_ag

SCHEDULE = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                      "prediction_type": "epsilon"})


class LinearUncond:
    """Unconditional prediction 0.5 x (exactly linear in the model input); the conditional one is not."""

    def __call__(self, x, t, cond):
        c = cond.float().reshape(-1, 1, 1, 1)
        return torch.where(c == 0, 0.5 * x, torch.tanh(x * c) + 0.01 * c * t.float().reshape(-1, 1, 1, 1) / 1000)


def _toy():
    return Denoiser(LinearUncond(), SCHEDULE, sample_shape=(1, 4, 4))


def test_the_fit_recovers_an_exact_relation_and_reproduces_cfg():
    den = _toy()
    fitting = Sampler(den, "dpmpp-2m", 8, guidance_scale=3.0)
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(1)
    lag = fit_linear_ag(fitting, cond, uncond, samples=12, batch_size=5, progress=False)
    assert lag.estimated_steps == (1, 3) == default_estimated_steps(8)
    # (the terms are collinear here, x_i being a step from x_{i-1} and the two outputs: the fit is exact
    # but its coefficients are not unique, so the residual and the samples are what is checked)
    assert max(lag.record["relative_residual_per_step"][1:]) < 1e-5
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1.0, 2.0, 3.0, 1.5])
    plain = Sampler(den, "dpmpp-2m", 8, guidance_scale=3.0).sample(noise, labels, uncond)
    estimated = Sampler(den, "dpmpp-2m", 8, guidance_scale=3.0, linear_ag=lag)
    torch.testing.assert_close(estimated.sample(noise, labels, uncond), plain, atol=1e-5, rtol=1e-5)
    assert estimated.stats["estimated_steps"] == 2
    assert estimated.stats["evaluations"] == 2 * 4 * 8 - 2 * 4
    assert estimated.stats["guided_per_step"] == [4, 0, 4, 0, 4, 4, 4, 4]


def test_a_wrong_relation_changes_the_samples():
    """The estimate is used: coefficients that are off give other samples than plain CFG."""
    den = _toy()
    cond, uncond = torch.tensor([1.0, 2.0]), torch.zeros(1)
    plain_sampler = Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0)
    wrong = LinearAG.for_plan(torch.tensor([[0.0, 0.0, 0.0, -1.0]] * 6), (2, 4), plain_sampler.plan)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    plain = plain_sampler.sample(noise, cond, uncond)
    off = Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0, linear_ag=wrong).sample(noise, cond, uncond)
    assert (off - plain).abs().max() > 1e-2


def test_linear_ag_with_adaptive_guidance_counts_both_savings():
    den = _toy()
    plan = Sampler(den, "dpmpp-2m", 10).plan
    lag = LinearAG.for_plan(torch.tensor([[0.0, 0.0, 0.0, 0.5]] * 10), (1, 3), plan)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    sampler = Sampler(den, "dpmpp-2m", 10, guidance_scale=2.0, adaptive_guidance=-0.5, linear_ag=lag)
    sampler.sample(noise, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(1))
    # step 0 evaluates every unconditional row and drops all (threshold -0.5): nothing is left to estimate
    assert sampler.stats["guided_per_step"] == [3] + [0] * 9
    assert sampler.stats["estimated_steps"] == 0
    assert sampler.stats["evaluations"] == 10 * 3 + 3


def test_coefficients_round_trip_and_refuse_another_plan(tmp_path):
    den = _toy()
    lag = LinearAG.for_plan(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), (1, 3),
                            Sampler(den, "dpmpp-2m", 6).plan, {"samples": 3})
    lag.save(tmp_path / "lag.json")
    back = LinearAG.load(tmp_path / "lag.json")
    assert torch.equal(back.coefficients, lag.coefficients) and back.estimated_steps == (1, 3)
    assert back.record == {"samples": 3} and back.plan == lag.plan
    Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0, linear_ag=back)  # the plan it was made for
    with pytest.raises(ValueError, match="fitted for another plan"):
        Sampler(den, "dpmpp-2m", 8, guidance_scale=3.0, linear_ag=back)
    for other in (Sampler(den, "ddim", 6), Sampler(den, "dpmpp-3m", 6), Sampler(den, "dpmpp-2m", 6,
                                                                                  use_karras_sigmas=True)):
        with pytest.raises(ValueError, match="fitted for another plan"):
            Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0,
                    linear_ag=LinearAG.for_plan(lag.coefficients, (1,), other.plan))
    with pytest.raises(ValueError, match="needs a guidance_scale"):
        Sampler(den, "dpmpp-2m", 6, linear_ag=back)
    with pytest.raises(TypeError, match="fitted LinearAG"):
        Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0, linear_ag={"steps": 6})
    with pytest.raises(ValueError, match="no past"):  # before any trajectory is run
        fit_linear_ag(Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0), torch.ones(1), torch.zeros(1),
                      estimated_steps=(0, 3))
    with pytest.raises(FileNotFoundError):
        LinearAG.load(tmp_path / "missing.json")


@pytest.mark.parametrize("kwargs, match", [
    ({"coefficients": torch.zeros(5, 4), "estimated_steps": (1,)}, "must be"),
    ({"coefficients": torch.zeros(6, 4), "estimated_steps": (0, 2)}, "step 0 has no past"),
    ({"coefficients": torch.full((6, 4), float("nan")), "estimated_steps": (1,)}, "NaN"),
])
def test_bad_coefficients_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearAG(plan="0123", steps=6, **kwargs)


def test_on_the_digits_dit_the_estimate_beats_the_conditional_fallback():
    den = models.load("digits-dit")
    sampler = Sampler(den, "dpmpp-2m", 10, guidance_scale=3.0)
    null = torch.full((1,), models.NULL_CLASS)
    lag = fit_linear_ag(sampler, torch.arange(10), null, samples=20, seed=11, progress=False)
    # held-out trajectories: at each estimated step, compare the estimate and cond against the true uncond
    labels = torch.tensor([0, 2, 4, 7, 9])
    state = sampler.start(torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(12)))
    previous, errors = None, []
    with torch.no_grad():
        for i in range(10):
            x_in, t = sampler.model_inputs(state)
            uncond, cond = den(torch.cat([x_in, x_in]), t.repeat(2), torch.cat([null.expand(5), labels])).chunk(2)
            if lag.estimates(i):
                guess = lag.estimate(i, cond, previous[0], previous[1], x_in)
                errors.append((float((guess - uncond).norm()), float((cond - uncond).norm())))
            previous = (cond, uncond)
            sampler.step(state, cond, uncond)
    assert len(errors) == len(lag.estimated_steps) >= 2
    for estimate_error, fallback_error in errors:
        assert estimate_error < 0.5 * fallback_error
