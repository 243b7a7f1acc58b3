"""Parity of the Euler, Euler ancestral and Heun plans with diffusers, at every step (fp32, 1e-5)."""
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import plan_for, plan_from_scheduler
from parity import ToyModel, check_parity, diffusers_trajectory, rel_err, toy_fn

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_euler_spacing_and_prediction(spacing, offset, ptype):
    check_parity(EulerDiscreteScheduler, dict(SD, timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype), 9)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_sigma_grids(sigmas, final, spacing):
    check_parity(EulerDiscreteScheduler, dict(SD, timestep_spacing=spacing, final_sigmas_type=final, **{sigmas: True}), 8)


def test_euler_karras_sigma_range():
    check_parity(EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0), 7)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_euler_log_linear_and_continuous(ptype):
    check_parity(EulerDiscreteScheduler, dict(SD, interpolation_type="log_linear", prediction_type=ptype), 6)
    check_parity(EulerDiscreteScheduler, dict(SD, timestep_type="continuous", prediction_type=ptype,
                                              use_karras_sigmas=True), 6)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("spacing,ptype", [("linspace", "epsilon"), ("trailing", "epsilon"),
                                           ("leading", "epsilon"), ("leading", "v_prediction")])
def test_zero_terminal_snr(cls, spacing, ptype):
    check_parity(cls, dict(SD, rescale_betas_zero_snr=True, prediction_type=ptype, timestep_spacing=spacing),
                 8, stochastic=cls is EulerAncestralDiscreteScheduler)


def exact_trajectory(scheduler, noise, steps, cond, ancestral):
    """diffusers' Euler / ancestral v-prediction step with its fp32 scalar coefficients, array maths in fp64."""
    scheduler.set_timesteps(steps)
    sig, gen = scheduler.sigmas, torch.Generator().manual_seed(1234)
    x, traj = noise.double() * float(scheduler.init_noise_sigma), []
    for i, t in enumerate(scheduler.timesteps):
        s, sn = sig[i], sig[i + 1]
        m = toy_fn(x.float() * (1 / float((s**2 + 1) ** 0.5)), t, cond).double()
        x0 = m * float(-s / (s**2 + 1) ** 0.5) + x / float(s**2 + 1)
        if ancestral:
            s_up = (sn**2 * (s**2 - sn**2) / s**2) ** 0.5
            x = x + (x - x0) / float(s) * float((sn**2 - s_up**2) ** 0.5 - s)
            x = x + torch.randn(x.shape, generator=gen).double() * float(s_up)
        else:
            x = x + (x - x0) / float(s) * float(sn - s)
        traj.append(x)
    return traj


CANCELLING = {"zero-snr-linspace": (dict(SD, rescale_betas_zero_snr=True, timestep_spacing="linspace"), 8),
              "zero-snr-trailing": (dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 8),
              "two-steps": (dict(), 2)}


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("case", sorted(CANCELLING))
def test_v_prediction_where_diffusers_fp32_cancels(cls, case):
    """A step from a large sigma (4096 at zero terminal SNR; 157 -> 0.01 in two steps) makes diffusers' fp32
    x + dt (x - x0) / sigma cancel (dt / sigma ~ -1): its own rounding reaches 1.2e-5 .. 1.5e-4 of the sample.
    Ours is checked against the same step in fp64 (1e-5 at every step; measured <= 5e-7) and against
    diffusers within twice diffusers' own fp32 error."""
    config, steps = CANCELLING[case]
    config = dict(config, prediction_type="v_prediction")
    ancestral = cls is EulerAncestralDiscreteScheduler
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    exact = exact_trajectory(cls(**config), noise, steps, cond, ancestral)
    gen = torch.Generator().manual_seed(1234)
    ref = diffusers_trajectory(cls(**config), toy_fn, noise, steps, cond, generator=gen)
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(cls(**config).config), sample_shape=(3, 8, 8))
    ours = []
    Sampler.from_scheduler(den, cls(**config), steps).sample(
        noise, cond=cond, generator=torch.Generator().manual_seed(1234), callback=lambda i, x: ours.append(x.clone()))
    for step, (a, r, e) in enumerate(zip(ours, ref, exact)):
        assert rel_err(a, e) <= 1e-5, f"step {step}: {rel_err(a, e):.3g} from the fp64 step"
        assert rel_err(a, r) <= 2 * rel_err(r, e) + 1e-6, f"step {step}: {rel_err(a, r):.3g} from diffusers"


def test_euler_churn_stochastic():
    churn = dict(s_churn=2.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.003)
    errors = check_parity(EulerDiscreteScheduler, dict(SD), 10, stochastic=True, step_kwargs=churn)
    assert len(errors) == 10
    check_parity(EulerDiscreteScheduler, dict(SD, prediction_type="v_prediction"), 6, stochastic=True,
                 step_kwargs=dict(s_churn=1.0))


def test_euler_default_churn_options_are_deterministic():
    check_parity(EulerDiscreteScheduler, dict(SD), 6, step_kwargs=dict(s_churn=0.0, s_tmin=0.0, s_noise=1.0))


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_euler_ancestral_stochastic(spacing, offset, ptype):
    check_parity(EulerAncestralDiscreteScheduler, dict(SD, timestep_spacing=spacing, steps_offset=offset,
                                                       prediction_type=ptype), 8, stochastic=True)


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_heun_spacing_and_prediction(spacing, offset, ptype):
    errors = check_parity(HeunDiscreteScheduler, dict(timestep_spacing=spacing, steps_offset=offset,
                                                      prediction_type=ptype), 6)
    assert len(errors) == 2 * 6 - 1


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_heun_sigma_grids(sigmas):
    check_parity(HeunDiscreteScheduler, dict(SD, **{sigmas: True}), 5)


@pytest.mark.parametrize("ptype", ["epsilon", "sample"])
def test_heun_clip_sample(ptype):
    check_parity(HeunDiscreteScheduler, dict(clip_sample=True, clip_sample_range=0.6, prediction_type=ptype), 8)


@pytest.mark.parametrize("cls,kwargs", [(EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
                                        (EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing")),
                                        (HeunDiscreteScheduler, dict())])
def test_unet_with_guidance(cls, kwargs):
    check_parity(cls, dict(SD, **kwargs), 6, model="unet", guidance_scale=3.0,
                 stochastic=cls is EulerAncestralDiscreteScheduler)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, HeunDiscreteScheduler])
def test_init_noise_sigma_and_timesteps_match(cls):
    for spacing in ("linspace", "leading", "trailing"):
        scheduler = cls(**SD, timestep_spacing=spacing)
        scheduler.set_timesteps(7)
        plan = plan_from_scheduler(scheduler, 7)
        assert plan.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)
        assert torch.equal(plan.timesteps().float(), scheduler.timesteps.float())


def test_presets():
    schedule = NoiseSchedule.from_config(dict(SD))
    assert plan_for("euler", schedule, 5).steps == 5
    assert plan_for("euler-ancestral", schedule, 5).n_noise == 5
    assert plan_for("heun", schedule, 5).steps == 9
    assert plan_for("euler", schedule, 5, s_churn=1.0).n_noise == 5


@pytest.mark.parametrize("cls,config,step_kwargs,option", [
    (EulerDiscreteScheduler, dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (HeunDiscreteScheduler, dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), {}, "prediction_type"),
])
def test_refused_options(cls, config, step_kwargs, option):
    with pytest.raises(NotImplementedError, match=option):
        check_parity(cls, dict(SD, **config), 4, step_kwargs=step_kwargs)


@pytest.mark.parametrize("solver,option", [("euler-ancestral", "use_karras_sigmas"), ("heun", "final_sigmas_type"),
                                           ("heun", "rescale_betas_zero_snr"), ("euler", "timesteps")])
def test_refused_preset_options(solver, option):
    schedule = NoiseSchedule.from_config(dict(SD))
    value = {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "rescale_betas_zero_snr": True,
             "timesteps": [999, 500]}[option]
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(EulerDiscreteScheduler(**SD), 4, **{option: value}) if option == "timesteps" \
            else plan_for(solver, schedule, 4, **{option: value})
