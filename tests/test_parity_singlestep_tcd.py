"""Parity of the DPM-Solver singlestep and TCD plans with diffusers' DPMSolverSinglestepScheduler and
TCDScheduler, at every step (fp32, 1e-5)."""
import inspect
import logging

import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler, TCDScheduler

import diffrt.runtime.solvers.singlestep  # noqa: F401  (registers its builder: solvers/__init__ does not import it)
import diffrt.runtime.solvers.tcd  # noqa: F401
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import OPTIONS, STEP_OPTIONS, plan_for, plan_from_scheduler
from diffrt.runtime.solvers.singlestep import order_list
from parity import ToyModel, check_parity, check_scheduler_parity, diffusers_trajectory, rel_err, toy_fn

# Stable Diffusion 1.5's scheduler config as its pipeline ships it (PNDM's keys included)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}
STEPS = [1, 2, 3, 5, 10, 20]
pytestmark = pytest.mark.filterwarnings("ignore:.*dpmsolver.*:FutureWarning")


@pytest.fixture(autouse=True)
def quiet_diffusers():
    """set_timesteps warns each time it turns lower_order_final on; the plans reproduce that change."""
    logger = logging.getLogger("diffusers.schedulers.scheduling_dpmsolver_singlestep")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def singlestep_from_sd15(**overrides):
    return lambda: DPMSolverSinglestepScheduler.from_config(dict(SD15), **overrides)


@pytest.mark.parametrize("scheduler_class", [DPMSolverSinglestepScheduler, TCDScheduler])
def test_options_are_the_diffusers_signature(scheduler_class):
    parameters = inspect.signature(scheduler_class.__init__).parameters
    assert set(OPTIONS[scheduler_class.__name__]) == set(parameters) - {"self"}
    step_parameters = set(inspect.signature(scheduler_class.step).parameters)
    assert set(STEP_OPTIONS.get(scheduler_class.__name__, ())) <= step_parameters


# --- DPM-Solver singlestep -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_defaults(order, solver_type, steps):
    errors = check_parity(DPMSolverSinglestepScheduler, dict(solver_order=order, solver_type=solver_type), steps)
    assert len(errors) == steps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_sd15(order, ptype, steps):
    check_scheduler_parity(singlestep_from_sd15(solver_order=order, prediction_type=ptype), steps)


@pytest.mark.parametrize("steps", [4, 6, 7, 8, 9, 12])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_final_steps(order, final, lower_order_final, steps):
    config = dict(solver_order=order, final_sigmas_type=final, lower_order_final=lower_order_final)
    check_scheduler_parity(singlestep_from_sd15(**config), steps)


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_sde(order, solver_type, steps):
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=order, solver_type=solver_type)
    check_scheduler_parity(singlestep_from_sd15(**config), steps, stochastic=True)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_noise_prediction_algorithm(order, solver_type, ptype):
    config = dict(algorithm_type="dpmsolver", solver_order=order, solver_type=solver_type, prediction_type=ptype,
                  final_sigmas_type="sigma_min")
    check_scheduler_parity(singlestep_from_sd15(**config), 10)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("grid", [
    dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(prediction_type="sample"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
], ids=["karras", "exponential", "sample", "cosine-clipped", "karras-sigma-min"])
def test_singlestep_sigma_grids(grid, algorithm):
    config = dict(dict(algorithm_type=algorithm, solver_order=3, solver_type="heun"), **grid)
    check_parity(DPMSolverSinglestepScheduler, config, 12, stochastic=algorithm.startswith("sde"))


def test_singlestep_diffusers_substitutions():  # deis -> dpmsolver++, bh2 -> midpoint (deis needs sigma_min)
    config = dict(algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min", solver_order=3)
    check_parity(DPMSolverSinglestepScheduler, config, 9)
    schedule = NoiseSchedule.from_config(dict(SD15))
    assert plan_for("dpmpp-3s", schedule, 9, **config).options["algorithm_type"] == "dpmsolver++"
    with pytest.raises(ValueError, match="final_sigmas_type"):
        plan_for("dpmpp-3s", schedule, 9, algorithm_type="deis")


@pytest.mark.parametrize("config,steps,stochastic", [
    (dict(), 10, False),
    (dict(solver_order=3, prediction_type="v_prediction", solver_type="heun"), 12, False),
    (dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 9, True),
], ids=["2s", "3s-v-heun", "3s-sde-karras"])
def test_singlestep_unet_with_guidance(config, steps, stochastic):
    check_scheduler_parity(singlestep_from_sd15(**config), steps, model="unet", guidance_scale=3.0,
                           stochastic=stochastic)


@pytest.mark.parametrize("steps", list(range(1, 22)))
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_order_list_is_diffusers(order, lower_order_final, final, steps):
    scheduler = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                             final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    assert order_list(steps, order, lower_order_final, final == "zero") == scheduler.order_list
    plan = plan_from_scheduler(DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                                            final_sigmas_type=final), steps)
    assert plan.options["orders"] == scheduler.order_list
    assert plan.n_slots == (max(scheduler.order_list) if max(scheduler.order_list) > 1 else 0)


@pytest.mark.parametrize("preset,overrides", [("dpmpp-2s", dict()), ("dpmpp-3s", dict(solver_order=3))])
def test_singlestep_presets_match_the_scheduler(preset, overrides):
    scheduler = DPMSolverSinglestepScheduler.from_config(dict(SD15), **overrides)
    ours = plan_for(preset, NoiseSchedule.from_config(dict(SD15)), 12)
    ref = plan_from_scheduler(scheduler, 12)
    for a, b in zip(ours.tables(3.0), ref.tables(3.0)):
        assert torch.equal(a, b)
    assert ours.n_noise == ref.n_noise == 0


def test_singlestep_sampler_preset_reproduces_diffusers():
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(dict(SD15)), sample_shape=(3, 8, 8))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(2)
    with torch.no_grad():
        reference = diffusers_trajectory(DPMSolverSinglestepScheduler.from_config(dict(SD15)), toy_fn, noise, 20,
                                         cond)[-1]
        ours = Sampler(den, "dpmpp-2s", 20).sample(noise, cond=cond)
    assert rel_err(ours, reference) <= 1e-5


@pytest.mark.parametrize("option,value", [
    ("thresholding", True), ("use_beta_sigmas", True), ("use_dynamic_shifting", True),
    ("variance_type", "learned"), ("variance_type", "learned_range"),
])
def test_singlestep_refused_options(option, value):
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(DPMSolverSinglestepScheduler(**{option: value}), 10)


def test_singlestep_refused_elsewhere():
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        plan_from_scheduler(DPMSolverSinglestepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), 10)
    schedule = NoiseSchedule.from_config(dict(SD15))
    with pytest.raises(NotImplementedError, match="sde-dpmsolver"):
        plan_for("dpmpp-2s", schedule, 10, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(NotImplementedError, match="step options"):
        plan_from_scheduler(DPMSolverSinglestepScheduler(), 10, eta=0.5)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        plan_for("dpmpp-2s", schedule, 10, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="solver_order"):
        plan_for("dpmpp-2s", schedule, 10, solver_order=4)


def test_singlestep_zero_terminal_snr_refused():  # the class has no rescale_betas_zero_snr: sigma_max is infinite
    schedule = NoiseSchedule.from_config(dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        plan_for("dpmpp-2s", schedule, 10)


# --- TCD -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_tcd_defaults(ptype, steps):
    errors = check_parity(TCDScheduler, dict(prediction_type=ptype), steps, stochastic=True)
    assert len(errors) == steps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_tcd_sd15(ptype, steps):
    check_scheduler_parity(lambda: TCDScheduler.from_config(dict(SD15), prediction_type=ptype), steps, stochastic=True)


@pytest.mark.parametrize("eta", [0.0, 0.05, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_eta(eta, steps):
    check_parity(TCDScheduler, dict(), steps, stochastic=True, step_kwargs=dict(eta=eta))


@pytest.mark.parametrize("config", [
    dict(original_inference_steps=30), dict(original_inference_steps=100), dict(original_inference_steps=8),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(clip_sample=True, clip_sample_range=0.5, thresholding=True, timestep_spacing="trailing", steps_offset=1,
         timestep_scaling=5.0, set_alpha_to_one=False),  # diffusers' TCD step reads none of these
], ids=["orig30", "orig100", "orig8", "zero-snr", "linear", "unread-options"])
def test_tcd_config(config):
    check_parity(TCDScheduler, config, 6, stochastic=True, step_kwargs=dict(eta=0.4))


def test_tcd_unet_with_guidance():
    check_scheduler_parity(lambda: TCDScheduler.from_config(dict(SD15)), 4, model="unet", guidance_scale=3.0,
                           stochastic=True)


def test_tcd_preset_and_plan_shape():
    schedule = NoiseSchedule.from_config(dict(SD15))
    plan = plan_for("tcd", schedule, 4, eta=0.5)
    ref = plan_from_scheduler(TCDScheduler.from_config(dict(SD15)), 4, eta=0.5)
    for a, b in zip(plan.tables(3.0), ref.tables(3.0)):
        assert torch.equal(a, b)
    assert [int(t) for t in plan.timesteps()] == [999, 759, 499, 259]
    assert plan.n_noise == 3 and plan.init_noise_sigma == 1.0 and plan.options["eta"] == 0.5
    assert plan_for("tcd", schedule, 4, eta=0.0).n_noise == 0
    assert plan_for("tcd", schedule, 4).options["eta"] == 0.3


def test_tcd_rows_carry_pred_noised_sample():  # what step() returns beside prev_sample
    scheduler = TCDScheduler.from_config(dict(SD15))
    scheduler.set_timesteps(4)
    plan = plan_from_scheduler(TCDScheduler.from_config(dict(SD15)), 4, eta=0.3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for row, t in zip(plan.rows, scheduler.timesteps):
        m = toy_fn(x, t, torch.arange(2))
        out = scheduler.step(m, t, x, eta=0.3, generator=generator)
        x0 = row.x0_x * x + row.x0_model * m
        ours = row.denoised.x * x + row.denoised.x0 * x0 + row.denoised.model * m
        assert rel_err(ours, out.pred_noised_sample) <= 1e-6
        x = out.prev_sample


def test_tcd_refused():
    schedule = NoiseSchedule.from_config(dict(SD15))
    with pytest.raises(NotImplementedError, match="s_churn"):
        plan_for("tcd", schedule, 4, s_churn=1.0)
    with pytest.raises(NotImplementedError, match="use_clipped_model_output"):
        plan_from_scheduler(TCDScheduler(), 4, use_clipped_model_output=True)
    with pytest.raises(ValueError, match="eta"):
        plan_for("tcd", schedule, 4, eta=1.5)
    with pytest.raises(ValueError, match="original_inference_steps"):
        plan_for("tcd", schedule, 60)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        plan_from_scheduler(TCDScheduler(rescale_betas_zero_snr=True), 4)
