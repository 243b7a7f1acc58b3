"""Parity of the DEIS multistep plans with diffusers' DEISMultistepScheduler, every step."""
import diffusers
from diffusers import DEISMultistepScheduler
import pytest
import torch

from diffrt.runtime import NoiseSchedule
from diffrt.runtime.solvers import plan_for, plan_from_scheduler
from parity import check_parity

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("steps", [5, 8, 15, 16])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_orders(order, lower_order_final, steps):
    check_parity(DEISMultistepScheduler, dict(solver_order=order, lower_order_final=lower_order_final), steps)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_deis_spacing_and_prediction(spacing, offset, ptype):
    check_parity(DEISMultistepScheduler, dict(SD, timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype,
                                              solver_order=3), 12)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("grid", [dict(use_karras_sigmas=True), dict(SD, use_karras_sigmas=True),
                                  dict(SD, use_exponential_sigmas=True)], ids=["karras", "karras-sd", "exponential"])
def test_deis_sigma_grids(grid, ptype):
    check_parity(DEISMultistepScheduler, dict(grid, prediction_type=ptype, solver_order=3), 10)


# Epsilon only: on the cosine schedule the first level is sigma_hat = 2e4 (alpha = 5e-5), where
# x' = 3149.5 x - 3148.5 eps; with v / sample predictions eps = (x - alpha x0)/sigma carries fp32
# rounding that this cancellation amplifies ~800x (diffusers' own fp32 step is 1.5e-3 off its
# float64 evaluation), so no other float order can agree with it to 1e-5 (measured: 3e-4).
@pytest.mark.parametrize("steps", [10, 16])
def test_deis_cosine_schedule(steps):
    check_parity(DEISMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2", solver_order=3), steps)


def test_deis_substituted_algorithm_and_solver_type():  # diffusers maps these to deis / logrho itself
    check_parity(DEISMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_type="midpoint"), 8)


@pytest.mark.parametrize("config,steps", [(dict(SD), 10), (dict(SD, solver_order=3, use_karras_sigmas=True), 12),
                                          (dict(SD, solver_order=3, timestep_spacing="trailing"), 16)],
                         ids=["2", "3-karras", "3-trailing-16"])
def test_deis_unet_with_guidance(config, steps):
    check_parity(DEISMultistepScheduler, config, steps, model="unet", guidance_scale=3.0)


def test_deis_preset_matches_the_scheduler():
    scheduler = diffusers.DEISMultistepScheduler(**SD)
    ours = plan_for("deis", NoiseSchedule.from_config(scheduler.config), 10)
    ref = plan_from_scheduler(scheduler, 10)
    for a, b in zip(ours.tables(3.0), ref.tables(3.0)):
        assert torch.equal(a, b)
    assert ours.n_noise == 0


@pytest.mark.parametrize("option,value", [("thresholding", True), ("use_beta_sigmas", True),
                                          ("use_dynamic_shifting", True)])
def test_deis_refused_options(option, value):
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(diffusers.DEISMultistepScheduler(**{option: value}), 10)


def test_deis_flow_sigmas_refused():
    scheduler = diffusers.DEISMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        plan_from_scheduler(scheduler, 10)


def test_deis_zero_snr_schedule_refused():  # DEIS has no zero-terminal-SNR handling (infinite last sigma)
    schedule = NoiseSchedule.from_config(dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    with pytest.raises(NotImplementedError, match="rescale_betas_zero_snr"):
        plan_for("deis", schedule, 10)


def test_deis_option_of_another_scheduler_refused():  # use_lu_lambdas is DPM-Solver's, not DEIS'
    schedule = NoiseSchedule.from_config(diffusers.DEISMultistepScheduler().config)
    with pytest.raises(NotImplementedError, match="use_lu_lambdas"):
        plan_for("deis", schedule, 10, use_lu_lambdas=True)


def test_deis_ignores_another_schedulers_keys_as_diffusers_does():  # DEIS.from_config(dpm.config) keeps them in .config
    scheduler = diffusers.DEISMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler(use_lu_lambdas=True).config)
    assert scheduler.config.get("use_lu_lambdas") is True
    plan = plan_from_scheduler(scheduler, 10)
    assert plan.steps == 10
