"""Parity of the PNDM, LMS, KDPM2 and KDPM2-ancestral plans with diffusers, at every step (fp32, 1e-5)."""
import inspect

import diffrt.runtime.solvers.kdpm2  # noqa: F401  (registers the builders: not yet imported by the package)
import diffrt.runtime.solvers.lms  # noqa: F401
import diffrt.runtime.solvers.pndm  # noqa: F401
import pytest
import torch
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import OPTIONS, STEP_OPTIONS, plan_for, plan_from_scheduler
from diffrt.runtime.solvers.lms import lagrange_basis_exact, lagrange_basis_quad
from diffusers import (
    EulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from parity import ToyModel, check_parity, check_scheduler_parity, diffusers_trajectory, rel_err, toy_fn

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD_PNDM = dict(SD, set_alpha_to_one=False, skip_prk_steps=True)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}
STEPS = [1, 2, 4, 10, 25]
SPACINGS = ["linspace", "leading", "trailing"]
PTYPES = ["epsilon", "v_prediction"]
K_CLASSES = [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler]
ALL_CLASSES = [PNDMScheduler, LMSDiscreteScheduler] + K_CLASSES


def is_ancestral(cls) -> bool:
    return cls is KDPM2AncestralDiscreteScheduler


def model_calls(cls, config: dict, steps: int) -> int:
    """Number of model calls diffusers makes for ``steps`` inference steps."""
    if cls is PNDMScheduler:
        return steps if steps == 1 else steps + 1 if config.get("skip_prk_steps") else steps + 9
    return 2 * steps - 1 if cls in K_CLASSES else steps


# ----------------------------------------------------------------------------- PNDM

@pytest.mark.parametrize("ptype", PTYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_pndm_sd15_plms(steps, ptype):
    errors = check_parity(PNDMScheduler, dict(SD_PNDM, prediction_type=ptype), steps)
    assert len(errors) == model_calls(PNDMScheduler, SD_PNDM, steps)


@pytest.mark.parametrize("skip_prk", [True, False])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("ptype", PTYPES)
def test_pndm_spacing_and_prk(skip_prk, spacing, ptype):
    config = dict(SD_PNDM, skip_prk_steps=skip_prk, timestep_spacing=spacing, prediction_type=ptype)
    for steps in (4, 7):
        assert len(check_parity(PNDMScheduler, config, steps)) == model_calls(PNDMScheduler, config, steps)


@pytest.mark.parametrize("steps", [4, 5, 10, 25])
def test_pndm_defaults_runge_kutta(steps):
    check_parity(PNDMScheduler, {}, steps)


def test_pndm_set_alpha_to_one_and_offset():
    check_parity(PNDMScheduler, dict(SD_PNDM, set_alpha_to_one=True, steps_offset=0), 6)
    check_parity(PNDMScheduler, dict(SD_PNDM, set_alpha_to_one=True, skip_prk_steps=False), 6)


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        plan_from_scheduler(PNDMScheduler(), 3)


# ----------------------------------------------------------------------------- LMS

@pytest.mark.parametrize("ptype", PTYPES + ["sample"])
@pytest.mark.parametrize("steps", STEPS)
def test_lms_sd(steps, ptype):
    if (steps, ptype) == (2, "v_prediction"):
        pytest.skip("diffusers' own fp32 error exceeds 1e-5 here: test_where_diffusers_fp32_cancels")
    check_parity(LMSDiscreteScheduler, dict(SD, prediction_type=ptype), steps)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_lms_spacing_and_order(spacing, order):
    check_parity(LMSDiscreteScheduler, dict(SD, timestep_spacing=spacing), 8, step_kwargs=dict(order=order))


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("ptype", PTYPES)
def test_lms_sigma_grids(sigmas, ptype):
    check_parity(LMSDiscreteScheduler, dict(SD, prediction_type=ptype, **{sigmas: True}), 10)


@pytest.mark.parametrize("steps", STEPS)
def test_lms_defaults(steps):
    check_parity(LMSDiscreteScheduler, {}, steps)


def test_lms_coefficients_quad_and_exact_agree():
    scheduler = LMSDiscreteScheduler(**SD)
    for steps in (3, 10, 25):
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas
        for i in range(steps):
            order = min(i + 1, 4)
            for j in range(order):
                quad, exact = lagrange_basis_quad(sigmas, order, i, j), lagrange_basis_exact(sigmas, order, i, j)
                assert quad == scheduler.get_lms_coefficient(order, i, j)
                assert abs(quad - exact) <= 1e-5 * max(1.0, abs(exact))


def test_lms_without_scipy(monkeypatch):
    """Without scipy the Lagrange integrals are exact polynomial integrals: still within 1e-5 of diffusers."""
    monkeypatch.setattr(diffrt.runtime.solvers.lms, "integrate", None)
    check_parity(LMSDiscreteScheduler, dict(SD), 10)
    check_parity(LMSDiscreteScheduler, dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 10)


# ----------------------------------------------------------------------------- KDPM2

@pytest.mark.parametrize("cls", K_CLASSES)
@pytest.mark.parametrize("ptype", PTYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_kdpm2_sd(cls, steps, ptype):
    if is_ancestral(cls) and (steps, ptype) == (2, "v_prediction"):
        pytest.skip("diffusers' own fp32 error exceeds 1e-5 here: test_where_diffusers_fp32_cancels")
    errors = check_parity(cls, dict(SD, prediction_type=ptype), steps, stochastic=is_ancestral(cls))
    assert len(errors) == model_calls(cls, SD, steps)


@pytest.mark.parametrize("cls", K_CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sigmas", [None, "use_karras_sigmas", "use_exponential_sigmas"])
def test_kdpm2_spacing_and_sigma_grids(cls, spacing, sigmas):
    config = dict(SD, timestep_spacing=spacing, **({sigmas: True} if sigmas else {}))
    check_parity(cls, config, 6, stochastic=is_ancestral(cls))
    check_parity(cls, dict(config, prediction_type="v_prediction"), 6, stochastic=is_ancestral(cls))


@pytest.mark.parametrize("cls", K_CLASSES)
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_kdpm2_defaults(cls, steps):
    check_parity(cls, {}, steps, stochastic=is_ancestral(cls))


def test_kdpm2_ancestral_draws_once_per_step_but_the_last():
    plan = plan_from_scheduler(KDPM2AncestralDiscreteScheduler(**SD), 7)
    assert plan.steps == 13 and plan.n_noise == 6
    assert [r.noise for r in plan.rows] == [False, True] * 6 + [False]
    errors = check_parity(KDPM2AncestralDiscreteScheduler, dict(SD), 7, stochastic=True, seed=3)
    assert len(errors) == 13


@pytest.mark.parametrize("cls", [LMSDiscreteScheduler] + K_CLASSES)
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_sigma_range_left_by_another_scheduler(cls, grid):
    """X.from_config(Euler's config with sigma_min / sigma_max): diffusers' exponential (and KDPM2's
    Karras) sigmas read the foreign keys; LMS's Karras sigmas ignore them."""
    euler = EulerDiscreteScheduler(**SD, sigma_min=0.1, sigma_max=8.0)
    check_scheduler_parity(lambda: cls.from_config(euler.config, **{grid: True}), 6, stochastic=is_ancestral(cls))


# ----------------------------------------------------------------------------- all classes

@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_unet_with_guidance(cls):
    config = SD_PNDM if cls is PNDMScheduler else SD
    errors = check_parity(cls, config, 5, model="unet", guidance_scale=7.5, stochastic=is_ancestral(cls))
    assert len(errors) == model_calls(cls, config, 5)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_from_the_sd15_config(cls):
    check_scheduler_parity(lambda: cls.from_config(dict(SD15)), 8, stochastic=is_ancestral(cls))


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_init_noise_sigma_match(cls, spacing):
    configs = [dict(SD, timestep_spacing=spacing)]
    if cls is PNDMScheduler:
        configs.append(dict(SD, timestep_spacing=spacing, skip_prk_steps=True))
    else:
        configs += [dict(SD, timestep_spacing=spacing, use_karras_sigmas=True),
                    dict(SD, timestep_spacing=spacing, use_exponential_sigmas=True)]
    for config in configs:
        for steps in (4, 9, 30):
            scheduler = cls(**config)
            scheduler.set_timesteps(steps)
            plan = plan_from_scheduler(scheduler, steps)
            assert torch.equal(plan.timesteps().float(), scheduler.timesteps.float()), (config, steps)
            assert plan.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)


def fp64_trajectory(make_scheduler, noise, steps, cond, stochastic):
    """diffusers' loop with the sample in float64 (its float32 scalars, fp32 model outputs and draws)."""
    gen = torch.Generator().manual_seed(1234) if stochastic else None
    return diffusers_trajectory(make_scheduler(), lambda x, t, c: toy_fn(x, t, c).float(), noise.double(), steps,
                                cond, generator=gen)


CANCELLING = {"pndm-trailing-1": (PNDMScheduler, dict(SD_PNDM, timestep_spacing="trailing"), 1),
              "lms-2": (LMSDiscreteScheduler, dict(SD), 2),
              "kdpm2-ancestral-2": (KDPM2AncestralDiscreteScheduler, dict(SD), 2)}


@pytest.mark.parametrize("case", sorted(CANCELLING))
def test_where_diffusers_fp32_cancels(case):
    """v-prediction in one or two steps: the step from sigma_max (14.6) to a small sigma makes diffusers'
    fp32 update cancel (x' ~ x0, from terms ~15 times larger): its own rounding reaches ~1.2e-5 of the sample.
    Ours is checked against the same loop in fp64 (1e-5 at every step) and against diffusers within twice
    diffusers' own fp32 error."""
    cls, config, steps = CANCELLING[case]
    config = dict(config, prediction_type="v_prediction")
    stochastic = is_ancestral(cls)
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    with torch.no_grad():
        exact = fp64_trajectory(lambda: cls(**config), noise, steps, cond, stochastic)
        ref = diffusers_trajectory(cls(**config), toy_fn, noise, steps, cond,
                                   generator=torch.Generator().manual_seed(1234) if stochastic else None)
        den = Denoiser(ToyModel(), NoiseSchedule.from_config(cls(**config).config), sample_shape=(3, 8, 8))
        ours = []
        Sampler.from_scheduler(den, cls(**config), steps).sample(
            noise, cond=cond, generator=torch.Generator().manual_seed(1234) if stochastic else None,
            callback=lambda i, x: ours.append(x.clone()))
    assert len(ours) == len(ref) == len(exact)
    for step, (a, r, e) in enumerate(zip(ours, ref, exact)):
        assert rel_err(a, e) <= 1e-5, f"step {step}: {rel_err(a, e):.3g} from the fp64 loop"
        assert rel_err(a, r) <= 2 * rel_err(r, e) + 1e-6, f"step {step}: {rel_err(a, r):.3g} from diffusers"


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_options_are_the_diffusers_signature(cls):
    assert set(OPTIONS[cls.__name__]) == set(inspect.signature(cls.__init__).parameters) - {"self"}


def test_lms_order_is_a_step_option():
    assert STEP_OPTIONS["LMSDiscreteScheduler"] == ("order",)
    assert plan_from_scheduler(LMSDiscreteScheduler(**SD), 6, order=2).n_slots == 1
    with pytest.raises(ValueError, match="order"):
        plan_from_scheduler(LMSDiscreteScheduler(**SD), 6, order=0)


@pytest.mark.parametrize("solver,steps,calls", [("pndm", 20, 21), ("lms", 20, 20), ("kdpm2", 20, 39),
                                                ("kdpm2-ancestral", 20, 39)])
def test_presets_on_an_sd15_model(solver, steps, calls):
    """Sampler(den, solver, steps) on SD 1.5's scheduler config = diffusers' X.from_config(that config)."""
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(dict(SD15)), sample_shape=(3, 8, 8))
    assert plan_for(solver, den.schedule, steps).steps == calls
    cls = {"pndm": PNDMScheduler, "lms": LMSDiscreteScheduler, "kdpm2": KDPM2DiscreteScheduler,
           "kdpm2-ancestral": KDPM2AncestralDiscreteScheduler}[solver]
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    stochastic = is_ancestral(cls)
    with torch.no_grad():
        reference = diffusers_trajectory(cls.from_config(dict(SD15)), toy_fn, noise, steps, cond,
                                         generator=torch.Generator().manual_seed(7) if stochastic else None)[-1]
        ours = Sampler(den, solver, steps).sample(noise, cond=cond,
                                                  generator=torch.Generator().manual_seed(7) if stochastic else None)
    assert rel_err(ours, reference) <= 1e-5


def test_lms_preset_takes_its_order():
    schedule = NoiseSchedule.from_config(dict(SD15))
    assert plan_for("lms", schedule, 6, order=2).options["order"] == 2


@pytest.mark.parametrize("cls,config,step_kwargs,option", [
    (PNDMScheduler, dict(prediction_type="sample"), {}, "prediction_type"),
    (LMSDiscreteScheduler, dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (KDPM2DiscreteScheduler, dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (KDPM2AncestralDiscreteScheduler, dict(use_beta_sigmas=True), {}, "use_beta_sigmas"),
    (KDPM2DiscreteScheduler, dict(prediction_type="sample"), {}, "prediction_type"),
    (KDPM2AncestralDiscreteScheduler, dict(prediction_type="sample"), {}, "prediction_type"),
])
def test_refused_options(cls, config, step_kwargs, option):
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(cls(**SD, **config), 4, **step_kwargs)


@pytest.mark.parametrize("solver,option,value", [("pndm", "eta", 0.5), ("kdpm2", "s_churn", 1.0),
                                                 ("kdpm2-ancestral", "sigma_min", 0.1), ("lms", "sigma_min", 0.1)])
def test_refused_preset_options(solver, option, value):
    schedule = NoiseSchedule.from_config(dict(SD15))
    with pytest.raises(NotImplementedError, match=option):
        plan_for(solver, schedule, 4, **{option: value})


@pytest.mark.parametrize("cls,option", [(PNDMScheduler, "eta"), (LMSDiscreteScheduler, "s_churn"),
                                        (KDPM2DiscreteScheduler, "order"), (KDPM2AncestralDiscreteScheduler, "eta")])
def test_refused_step_options(cls, option):
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(cls(**SD), 4, **{option: 1})
