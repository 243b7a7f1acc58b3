"""Parity of flow matching with diffusers at every step (fp32, 1e-5): the set_timesteps arguments of
FlowMatchEulerDiscreteScheduler (custom sigmas as FluxPipeline passes them, mu for dynamic shifting, custom
timesteps) and FlowMatchHeunDiscreteScheduler."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

import diffrt.runtime.solvers.flow_heun  # noqa: F401  (registers flow-heun until solvers/__init__ imports it)
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import plan_for, plan_from_scheduler
from parity import (TOL, ToyModel, check_parity, check_scheduler_parity, diffusers_trajectory, rel_err, tiny_unet,
                    toy_fn, unet_fn)

# FLUX.1-dev's scheduler config; FLUX.1-schnell's has use_dynamic_shifting=False and shift=1.0
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
SD3 = dict(num_train_timesteps=1000, shift=3.0)


def flux_sigmas(steps: int) -> np.ndarray:
    """The sigmas FluxPipeline passes to set_timesteps."""
    return np.linspace(1.0, 1 / steps, steps)


def flux_mu(image_seq_len: int, config: dict = FLUX_DEV) -> float:
    """FluxPipeline's calculate_shift: mu linear in the image sequence length (4096 tokens: 1024x1024)."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * slope + config["base_shift"] - slope * config["base_image_seq_len"]


def toy_denoiser(config: dict) -> Denoiser:
    return Denoiser(ToyModel(), NoiseSchedule.from_config(config), sample_shape=(3, 8, 8))


def check_grid_parity(config: dict, steps: int, grid: dict, model: str = "toy", guidance_scale=None,
                      stochastic: bool = False, batch: int = 2) -> list[float]:
    """Our sampler (``grid`` as step options of Sampler.from_scheduler) against diffusers' loop after
    set_timesteps(**grid), without num_inference_steps when the grid is custom (as retrieve_timesteps calls it)."""
    reference = FlowMatchEulerDiscreteScheduler(**config)
    custom = grid.get("sigmas") is not None or grid.get("timesteps") is not None
    reference.set_timesteps = lambda n: FlowMatchEulerDiscreteScheduler.set_timesteps(
        reference, None if custom else n, **grid)
    noise = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(batch) % 10
    uncond = torch.full_like(cond, 9) if guidance_scale is not None else None
    if model == "toy":
        fn, den = toy_fn, toy_denoiser(reference.config)
    else:
        unet = tiny_unet()
        fn, den = unet_fn(unet), Denoiser.from_diffusers(unet, reference.config)
    sampler = Sampler.from_scheduler(den, FlowMatchEulerDiscreteScheduler(**config), steps,
                                     guidance_scale=guidance_scale, **grid)
    ours = []
    with torch.no_grad():
        ref = diffusers_trajectory(reference, fn, noise, steps, cond, uncond, guidance_scale,
                                   torch.Generator().manual_seed(1234) if stochastic else None)
        sampler.sample(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1234) if stochastic
                       else None, callback=lambda i, x: ours.append(x.clone()))
    assert len(ours) == len(ref) == steps
    errors = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errors) <= TOL, errors
    return errors


# --- FluxPipeline: custom sigmas and mu -------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_dev_sigmas_and_mu(steps):
    check_grid_parity(FLUX_DEV, steps, dict(sigmas=flux_sigmas(steps), mu=flux_mu(4096)))


def test_flux_dev_unet_with_guidance():
    check_grid_parity(FLUX_DEV, 6, dict(sigmas=flux_sigmas(6), mu=flux_mu(1024)), model="unet", guidance_scale=3.5)


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_schnell_ignores_mu_like_diffusers(steps):
    """FluxPipeline passes mu to schnell too; without use_dynamic_shifting the scheduler ignores it."""
    check_grid_parity(FLUX_SCHNELL, steps, dict(sigmas=flux_sigmas(steps), mu=flux_mu(4096)))
    check_grid_parity(FLUX_SCHNELL, steps, dict(sigmas=list(flux_sigmas(steps))))


# --- dynamic shifting --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,mu", [("exponential", 0.5), ("exponential", 1.15), ("exponential", -0.4),
                                     ("linear", 0.8), ("linear", 3.0)])
@pytest.mark.parametrize("custom_sigmas", [False, True])
def test_dynamic_shifting_time_shift_types(kind, mu, custom_sigmas):
    grid = dict(mu=mu, sigmas=flux_sigmas(9) if custom_sigmas else None)
    check_grid_parity(dict(FLUX_DEV, time_shift_type=kind), 9, grid)


@pytest.mark.parametrize("options", [dict(shift_terminal=0.1), dict(use_karras_sigmas=True),
                                     dict(use_exponential_sigmas=True), dict(invert_sigmas=True),
                                     dict(stochastic_sampling=True)])
def test_dynamic_shifting_with_sigma_options(options):
    stochastic = options.get("stochastic_sampling", False)
    check_grid_parity(dict(FLUX_DEV, **options), 7, dict(mu=0.9), stochastic=stochastic)
    check_grid_parity(dict(FLUX_DEV, **options), 7, dict(mu=0.9, sigmas=flux_sigmas(7)), stochastic=stochastic)


def test_dynamic_shifting_schedule_is_unshifted():
    """NoiseSchedule takes a dynamic-shifting config; its training sigmas are diffusers' (unshifted) ones."""
    schedule = NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_DEV))
    assert schedule.kind == "flow" and schedule.shift == 1.0
    assert torch.equal(schedule.sigmas.flip(0), FlowMatchEulerDiscreteScheduler(**FLUX_DEV).sigmas)


def test_preset_takes_mu_and_sigmas():
    """Sampler(den, "flow-euler", N, mu=...) and plan_for(..., sigmas=...) reproduce diffusers' grid and loop."""
    den = toy_denoiser(FLUX_DEV)
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    reference.set_timesteps(sigmas=flux_sigmas(5), mu=0.8)
    plan = plan_for("flow-euler", den.schedule, 5, sigmas=flux_sigmas(5), mu=0.8)
    assert plan.timesteps().float().tolist() == reference.timesteps.tolist()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.arange(2)
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    reference.set_timesteps = lambda n: FlowMatchEulerDiscreteScheduler.set_timesteps(reference, n, mu=0.8)
    with torch.no_grad():
        expected = diffusers_trajectory(reference, toy_fn, noise, 5, cond)[-1]
        ours = Sampler(den, "flow-euler", 5, mu=0.8).sample(noise, cond=cond)
    assert rel_err(ours, expected) <= TOL


# --- SD3: fixed shift 3, custom timesteps ---------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_shift(steps):
    check_parity(FlowMatchEulerDiscreteScheduler, SD3, steps)


def test_sd3_unet_with_guidance():
    check_parity(FlowMatchEulerDiscreteScheduler, SD3, 28, model="unet", guidance_scale=7.0)


@pytest.mark.parametrize("config", [SD3, FLUX_DEV])
def test_custom_timesteps(config):
    """timesteps alone (the model sees them; the sigmas are timesteps / T, shifted), or with sigmas."""
    timesteps = [980.0, 870.5, 700.0, 455.0, 210.0, 35.0]
    mu = dict(mu=1.0) if config.get("use_dynamic_shifting") else {}
    check_grid_parity(config, 6, dict(timesteps=timesteps, **mu))
    check_grid_parity(config, 6, dict(timesteps=timesteps, sigmas=np.linspace(1.0, 0.1, 6), **mu))


# --- Heun ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 7, 12])
def test_heun(shift, steps):
    errors = check_parity(FlowMatchHeunDiscreteScheduler, dict(shift=shift), steps)
    assert len(errors) == 2 * steps - 1


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, 3])
def test_heun_few_steps_against_exact_derivatives(shift, steps):
    """At 2-3 steps diffusers' fp32 second stage, (x - (x - s m)) / s at s = sigma_min (0.001 with shift 1),
    loses up to 2e-5 to cancellation; we match its own loop fed float64 model outputs (exact derivatives)."""
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(2)
    ours = []
    with torch.no_grad():
        exact = diffusers_trajectory(FlowMatchHeunDiscreteScheduler(shift=shift), toy_fn, noise.double(), steps, cond)
        Sampler(toy_denoiser(SD3), "flow-heun", steps, shift=shift).sample(
            noise, cond=cond, callback=lambda i, x: ours.append(x.clone()))
    assert exact[0].dtype == torch.float64 and len(ours) == len(exact) == 2 * steps - 1
    assert max(rel_err(a, b) for a, b in zip(ours, exact)) <= TOL


@pytest.mark.parametrize("churn", [dict(s_churn=2.0), dict(s_churn=1.0, s_tmin=0.2, s_tmax=0.9, s_noise=0.8)])
def test_heun_churn(churn):
    check_scheduler_parity(lambda: FlowMatchHeunDiscreteScheduler(shift=3.0), 6, stochastic=True, step_kwargs=churn)


def test_heun_unet_with_guidance():
    check_parity(FlowMatchHeunDiscreteScheduler, dict(shift=3.0), 5, model="unet", guidance_scale=4.0)
    check_parity(FlowMatchHeunDiscreteScheduler, dict(shift=3.0), 4, model="unet", guidance_scale=4.0,
                 stochastic=True, step_kwargs=dict(s_churn=1.5))


def test_heun_plan_shape():
    reference = FlowMatchHeunDiscreteScheduler(shift=3.0)
    reference.set_timesteps(5)
    plan = plan_for("flow-heun", NoiseSchedule.from_config(reference.config), 5)
    assert plan.steps == 9 and plan.n_slots == 1 and plan.n_noise == 0 and plan.init_noise_sigma == 1.0
    assert plan.timesteps().float().tolist() == reference.timesteps.tolist()
    assert plan_for("flow-heun", NoiseSchedule.from_config(reference.config), 5, s_churn=1.0).n_noise == 9


def test_heun_from_a_flux_config():
    """FlowMatchHeunDiscreteScheduler.from_config(FLUX.1-dev's config) keeps shift and ignores the rest."""
    check_scheduler_parity(lambda: FlowMatchHeunDiscreteScheduler.from_config(FLUX_DEV), 4)


# --- refused and invalid options ----------------------------------------------------------------------

def test_dynamic_shifting_needs_mu_like_diffusers():
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(**FLUX_DEV).set_timesteps(4)
    with pytest.raises(ValueError, match="mu"):
        plan_from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_DEV), 4)
    with pytest.raises(ValueError, match="mu"):
        plan_from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_DEV), 4, sigmas=flux_sigmas(4))
    with pytest.raises(ValueError, match="mu"):
        Sampler(toy_denoiser(FLUX_DEV), "flow-euler", 4)
    with pytest.raises(ValueError, match="mu"):
        plan_for("flow-euler", NoiseSchedule.from_config(SD3), 4, use_dynamic_shifting=True)


@pytest.mark.parametrize("grid,match", [(dict(sigmas=flux_sigmas(3)), "sigmas"),
                                        (dict(timesteps=[900.0, 500.0]), "timesteps"),
                                        (dict(timesteps=[500.0, 500.0, 300.0, 100.0]), "repeats")])
def test_invalid_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        plan_from_scheduler(FlowMatchEulerDiscreteScheduler(**SD3), 4, **grid)


def test_invalid_time_shift_type():
    with pytest.raises(ValueError, match="time_shift_type"):
        plan_for("flow-euler", NoiseSchedule.from_config(FLUX_DEV), 4, mu=0.5, time_shift_type="cosine")


@pytest.mark.parametrize("scheduler,options,name", [
    (FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (FlowMatchEulerDiscreteScheduler(), dict(per_token_timesteps=torch.ones(2, 4)), "per_token_timesteps"),
    (FlowMatchHeunDiscreteScheduler(), dict(mu=0.5), "mu"),
    (FlowMatchHeunDiscreteScheduler(), dict(sigmas=flux_sigmas(4)), "sigmas"),
])
def test_refused_from_scheduler(scheduler, options, name):
    with pytest.raises(NotImplementedError, match=name):
        plan_from_scheduler(scheduler, 4, **options)


@pytest.mark.parametrize("options,name", [(dict(sigmas=flux_sigmas(4)), "sigmas"), (dict(mu=0.5), "mu"),
                                          (dict(use_dynamic_shifting=True), "use_dynamic_shifting")])
def test_heun_preset_refuses_euler_options(options, name):
    with pytest.raises(NotImplementedError, match=name):
        plan_for("flow-heun", NoiseSchedule.from_config(SD3), 4, **options)


def test_heun_needs_flow_denoiser():
    with pytest.raises(ValueError, match="flow-matching"):
        plan_from_scheduler(FlowMatchHeunDiscreteScheduler(), 4, schedule=NoiseSchedule.linear())
