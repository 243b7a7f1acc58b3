"""Parity of the LCM and flow-matching Euler plans with diffusers, at every step (fp32, 1e-5)."""
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

from diffrt.runtime import NoiseSchedule
from diffrt.runtime.solvers import plan_for, plan_from_scheduler
from parity import check_parity


# --- LCM -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 7])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_lcm_prediction_types(steps, ptype):
    errors = check_parity(LCMScheduler, dict(prediction_type=ptype), steps, stochastic=True)
    assert len(errors) == steps


@pytest.mark.parametrize("original,scaling", [(50, 10.0), (30, 5.0), (100, 10.0), (8, 2.5)])
def test_lcm_grid_and_scaling(original, scaling):
    check_parity(LCMScheduler, dict(original_inference_steps=original, timestep_scaling=scaling), 6, stochastic=True)


@pytest.mark.parametrize("ptype", ["epsilon", "sample"])
def test_lcm_clip_sample(ptype):
    check_parity(LCMScheduler, dict(clip_sample=True, clip_sample_range=0.7, prediction_type=ptype), 5, stochastic=True)


def test_lcm_zero_terminal_snr_and_ignored_options():
    check_parity(LCMScheduler, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), 6, stochastic=True)
    check_parity(LCMScheduler, dict(timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False,
                                    beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 5, stochastic=True)


def test_lcm_unet_with_guidance():
    check_parity(LCMScheduler, dict(), 4, model="unet", guidance_scale=3.0, stochastic=True)


def test_lcm_plan_shape():
    schedule = NoiseSchedule.from_config(LCMScheduler().config)
    plan = plan_for("lcm", schedule, 4)
    assert [int(t) for t in plan.timesteps()] == [999, 759, 499, 259]
    assert plan.n_noise == 3 and plan.init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="original_inference_steps"):
        plan_for("lcm", schedule, 60)


def test_lcm_refused():
    with pytest.raises(NotImplementedError, match="thresholding"):
        check_parity(LCMScheduler, dict(thresholding=True), 4, stochastic=True)
    with pytest.raises(NotImplementedError, match="original_inference_steps"):
        plan_from_scheduler(LCMScheduler(), 4, original_inference_steps=20)


# --- flow matching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [5, 12])
def test_flow_shift(shift, steps):
    check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=shift), steps)


@pytest.mark.parametrize("options", [dict(shift_terminal=0.1), dict(use_karras_sigmas=True),
                                     dict(use_exponential_sigmas=True), dict(invert_sigmas=True),
                                     dict(shift_terminal=0.05, use_karras_sigmas=True)])
def test_flow_sigma_options(options):
    check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=3.0, **options), 8)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_stochastic_sampling(shift):
    check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=shift, stochastic_sampling=True), 7, stochastic=True)


def test_flow_ignores_churn_like_diffusers():
    check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 6, step_kwargs=dict(s_churn=1.0, s_noise=0.9))


def test_flow_unet_with_guidance():
    check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 6, model="unet", guidance_scale=3.0)


def test_flow_preset_and_timesteps():
    schedule = NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    plan = plan_for("flow-euler", schedule, 5)
    assert plan.timesteps().float().tolist() == scheduler.timesteps.tolist()
    assert plan.init_noise_sigma == 1.0 and plan.n_noise == 0


@pytest.mark.parametrize("config,step_kwargs,option", [
    (dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (dict(), dict(per_token_timesteps=None), "per_token_timesteps"),
])
def test_flow_refused(config, step_kwargs, option):
    with pytest.raises(NotImplementedError, match=option):
        if step_kwargs:
            plan_from_scheduler(FlowMatchEulerDiscreteScheduler(**config), 4, **step_kwargs)
        else:
            check_parity(FlowMatchEulerDiscreteScheduler, dict(shift=3.0, **config), 4)


def test_flow_preset_dynamic_shifting_needs_mu():  # sigmas, mu, dynamic shifting: tests/test_parity_flow.py
    schedule = NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(ValueError, match="mu"):
        plan_for("flow-euler", schedule, 4, use_dynamic_shifting=True)


def test_flow_needs_flow_denoiser():
    with pytest.raises(ValueError, match="flow-matching"):
        plan_from_scheduler(FlowMatchEulerDiscreteScheduler(), 4, schedule=NoiseSchedule.linear())
