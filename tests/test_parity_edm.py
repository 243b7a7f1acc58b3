"""Parity of the EDM Euler and EDM DPM-Solver++ plans with diffusers' EDM schedulers, at every step (fp32, 1e-5)."""
import diffrt.runtime.solvers.edm  # noqa: F401  (registers the EDM builders)

import inspect

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import OPTIONS, plan_for, plan_from_scheduler
from parity import ToyModel, check_parity, check_scheduler_parity, diffusers_trajectory, rel_err, toy_fn

# Playground v2.5-like: SDXL-based EDM model, exponential sigmas, sigma_data 0.5
PLAYGROUND = dict(sigma_schedule="exponential", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
PLAYGROUND_CONFIG = {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                     "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
                     "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0,
                     "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002,
                     "sigma_schedule": "exponential", "solver_order": 2, "solver_type": "midpoint",
                     "thresholding": False}
GRIDS = {"karras": dict(), "exponential": dict(PLAYGROUND),
         "karras-rho5": dict(sigma_min=0.01, sigma_max=20.0, sigma_data=1.0, rho=5.0)}


@pytest.mark.parametrize("cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_options_are_the_diffusers_signature(cls):
    assert set(OPTIONS[cls.__name__]) == set(inspect.signature(cls.__init__).parameters) - {"self"}


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_euler(grid, ptype, final, steps):
    errors = check_parity(EDMEulerScheduler, dict(GRIDS[grid], prediction_type=ptype, final_sigmas_type=final), steps)
    assert len(errors) == steps


def exact_euler_trajectory(scheduler, noise, steps, cond):
    """diffusers' EDM Euler step with its fp32 scalar coefficients, the array maths in fp64."""
    scheduler.set_timesteps(steps)
    sigmas, sigma_data = scheduler.sigmas, scheduler.config.sigma_data
    sign = 1.0 if scheduler.config.prediction_type == "epsilon" else -1.0
    x, traj = noise.double() * float(scheduler.init_noise_sigma), []
    for i, t in enumerate(scheduler.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        m = toy_fn(x.float() * float(1 / ((s**2 + sigma_data**2) ** 0.5)), t, cond).double()
        c_skip = float(sigma_data**2 / (s**2 + sigma_data**2))
        c_out = sign * float(s * sigma_data / (s**2 + sigma_data**2) ** 0.5)
        x0 = x * c_skip + m * c_out
        x = x + (x - x0) / float(s) * float(s_next - s)
        traj.append(x)
    return traj


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_euler_few_steps_where_diffusers_fp32_cancels(grid, ptype, steps):
    """The last Euler step from sigma ~80 to 0 is x - (x - x0) with |x| ~ 80 |x0| in diffusers' fp32: its own
    rounding is ~2e-5 of the sample. Ours is checked against the same steps in fp64 (1e-5 at every step;
    measured <= 2e-7) and against diffusers within twice diffusers' own fp32 error."""
    config = dict(GRIDS[grid], prediction_type=ptype)
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    exact = exact_euler_trajectory(EDMEulerScheduler(**config), noise, steps, cond)
    with torch.no_grad():
        ref = diffusers_trajectory(EDMEulerScheduler(**config), toy_fn, noise, steps, cond)
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(EDMEulerScheduler(**config).config), sample_shape=(3, 8, 8))
    ours = []
    Sampler.from_scheduler(den, EDMEulerScheduler(**config), steps).sample(
        noise, cond=cond, callback=lambda i, x: ours.append(x.clone()))
    assert len(ours) == len(ref) == steps
    for step, (a, r, e) in enumerate(zip(ours, ref, exact)):
        assert rel_err(a, e) <= 1e-5, f"step {step}: {rel_err(a, e):.3g} from the fp64 step"
        assert rel_err(a, r) <= 2 * rel_err(r, e) + 1e-6, f"step {step}: {rel_err(a, r):.3g} from diffusers"


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_euler_churn_stochastic(grid):
    churn = dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)
    check_parity(EDMEulerScheduler, dict(GRIDS[grid]), 10, stochastic=True, step_kwargs=churn)
    check_parity(EDMEulerScheduler, dict(GRIDS[grid], prediction_type="v_prediction"), 6, stochastic=True,
                 step_kwargs=dict(s_churn=1.0))


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_orders(algorithm, order, solver_type, steps):
    if algorithm == "sde-dpmsolver++" and order == 3 and steps >= 10:
        pytest.skip("a third-order sde-dpmsolver++ step: refused (test_refused_options)")
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type)
    errors = check_parity(EDMDPMSolverMultistepScheduler, config, steps, stochastic=algorithm.startswith("sde"))
    assert len(errors) == steps


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_dpm_grids_and_predictions(grid, ptype, order, steps):
    check_parity(EDMDPMSolverMultistepScheduler, dict(GRIDS[grid], prediction_type=ptype, solver_order=order), steps)


@pytest.mark.parametrize("steps", [1, 4, 14, 15, 25])
@pytest.mark.parametrize("euler_at_final", [False, True])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_dpm_final_steps(grid, final, lower_order_final, euler_at_final, steps):
    check_parity(EDMDPMSolverMultistepScheduler, dict(GRIDS[grid], final_sigmas_type=final, solver_order=2,
                                                      lower_order_final=lower_order_final,
                                                      euler_at_final=euler_at_final), steps)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_playground_config_as_shipped(ptype):
    """EDMDPMSolverMultistepScheduler.from_config(Playground v2.5-like config), also swapped to EDM Euler."""
    config = dict(PLAYGROUND_CONFIG, prediction_type=ptype)
    check_scheduler_parity(lambda: EDMDPMSolverMultistepScheduler.from_config(config), 25)
    check_scheduler_parity(lambda: EDMEulerScheduler.from_config(config), 25)


@pytest.mark.parametrize("cls,config", [(EDMEulerScheduler, dict(PLAYGROUND)),
                                        (EDMDPMSolverMultistepScheduler, dict(PLAYGROUND, solver_order=3)),
                                        (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"))])
def test_guidance(cls, config):
    stochastic = config.get("algorithm_type") == "sde-dpmsolver++"
    check_parity(cls, config, 10, guidance_scale=5.0, stochastic=stochastic)
    check_parity(cls, config, 6, model="unet", guidance_scale=3.0, stochastic=stochastic)


@pytest.mark.parametrize("cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_init_noise_sigma_timesteps_and_input_scales_match(cls, grid):
    for steps in (1, 7, 30):
        scheduler = cls(**GRIDS[grid])
        scheduler.set_timesteps(steps)
        plan = plan_from_scheduler(scheduler, steps)
        assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)
        assert torch.equal(plan.timesteps().float(), scheduler.timesteps.float())
        scales = torch.stack([scheduler.precondition_inputs(torch.ones(()), s) for s in scheduler.sigmas[:-1]])
        assert torch.equal(plan.input_scales().float(), scales.float())


def test_presets():
    schedule = NoiseSchedule.from_config(EDMDPMSolverMultistepScheduler(**PLAYGROUND).config)
    assert plan_for("edm-euler", schedule, 5).steps == 5
    assert plan_for("edm-euler", schedule, 5, s_churn=1.0).n_noise == 5
    assert plan_for("edm-dpmpp-2m", schedule, 10).options["orders"] == [1] + [2] * 8 + [1]
    assert plan_for("edm-dpmpp-3m", schedule, 10).options["orders"] == [1, 2] + [3] * 6 + [2, 1]
    assert plan_for("edm-dpmpp-2m-sde", schedule, 10).n_noise == 10


@pytest.mark.parametrize("solver,cls,preset", [
    ("edm-euler", EDMEulerScheduler, {}),
    ("edm-dpmpp-3m", EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
])
def test_preset_on_the_models_config_reproduces_diffusers(solver, cls, preset):
    """Sampler(den, preset) takes the model's EDM config (sigma_schedule, sigma_data, prediction type)."""
    config = dict(PLAYGROUND, prediction_type="v_prediction")
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(cls(**config).config), sample_shape=(3, 8, 8))
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    with torch.no_grad():
        reference = diffusers_trajectory(cls(**config, **preset), toy_fn, noise, 12, cond)[-1]
        ours = Sampler(den, solver, 12).sample(noise, cond=cond)
    assert rel_err(ours, reference) <= 1e-5


@pytest.mark.parametrize("cls,config,option", [
    (EDMDPMSolverMultistepScheduler, dict(thresholding=True), "thresholding"),
    (EDMDPMSolverMultistepScheduler, dict(prediction_type="sample"), "prediction_type"),
    (EDMEulerScheduler, dict(prediction_type="sample"), "prediction_type"),
    (EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order"),
])
def test_refused_options(cls, config, option):
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(cls(**config), 10)


@pytest.mark.parametrize("solver,option,value", [
    ("edm-euler", "sigma_schedule", "linear"), ("edm-dpmpp-2m", "sigma_schedule", "linear"),
    ("edm-euler", "final_sigmas_type", "sigma_max"), ("edm-dpmpp-2m", "final_sigmas_type", "sigma_max"),
    ("edm-dpmpp-2m", "algorithm_type", "dpmsolver"), ("edm-dpmpp-2m", "solver_type", "bh3"),
    ("edm-dpmpp-2m", "eta", 0.0),
])
def test_refused_preset_options(solver, option, value):
    with pytest.raises(NotImplementedError, match=option):
        plan_for(solver, NoiseSchedule.from_config(dict(PLAYGROUND)), 4, **{option: value})


def test_refused_step_options():
    with pytest.raises(NotImplementedError, match="s_churn"):
        plan_from_scheduler(EDMDPMSolverMultistepScheduler(), 4, s_churn=1.0)


def test_diffusers_nan_step_is_refused():
    """final_sigmas_type="sigma_min" with >= 15 steps: a second-order (heun) or third-order last step from
    sigma_min to sigma_min has h ~ 0 and diffusers' own result is NaN; the plan refuses it instead."""
    for config in (dict(final_sigmas_type="sigma_min", solver_type="heun"),
                   dict(final_sigmas_type="sigma_min", solver_order=3)):
        with pytest.raises(ValueError, match="non-finite"):
            plan_from_scheduler(EDMDPMSolverMultistepScheduler(**config), 25)


def test_repeated_first_timestep_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        plan_from_scheduler(EDMEulerScheduler(sigma_min=1.0, sigma_max=1.0), 4)
