"""UniPC (UniP + UniC, bh1/bh2, orders 1-3) against diffusers' UniPCMultistepScheduler, every step <= 1e-5."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import plan_for, plan_from_scheduler
from parity import ToyModel, check_parity, diffusers_trajectory, rel_err, toy_fn

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type,predict_x0,final", [("bh2", True, "zero"), ("bh2", False, "sigma_min"),
                                                          ("bh1", True, "sigma_min"), ("bh1", False, "sigma_min")])
def test_unipc_solver_types(solver_type, order, predict_x0, final):
    check_parity(UniPCMultistepScheduler, dict(solver_type=solver_type, solver_order=order, predict_x0=predict_x0,
                                               final_sigmas_type=final), 10)


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_lower_order_final_off(order, steps):
    check_parity(UniPCMultistepScheduler, dict(solver_order=order, lower_order_final=False,
                                               final_sigmas_type="sigma_min"), steps)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("disabled", [[0, 1, 2], [4, 7], "all"])
def test_unipc_disable_corrector(order, disabled):
    steps = 12
    disabled = list(range(steps)) if disabled == "all" else disabled
    check_parity(UniPCMultistepScheduler, dict(solver_order=order, disable_corrector=disabled), steps)


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("predict_x0,final", [(True, "zero"), (False, "sigma_min")])
def test_unipc_spacing_and_prediction(spacing, offset, ptype, predict_x0, final):
    check_parity(UniPCMultistepScheduler, dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype,
                                               predict_x0=predict_x0, final_sigmas_type=final, solver_order=3, **SD), 16)


@pytest.mark.parametrize("extra", [dict(), dict(final_sigmas_type="sigma_min"), dict(solver_order=3),
                                   dict(sigma_min=0.05, sigma_max=20.0)])
def test_unipc_karras(extra):
    check_parity(UniPCMultistepScheduler, dict(use_karras_sigmas=True, **SD, **extra), 12)


ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction", **SD)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_unipc_zero_snr(final):
    check_parity(UniPCMultistepScheduler, dict(final_sigmas_type=final, **ZERO_SNR), 10)


@pytest.mark.parametrize("config,steps", [
    (dict(predict_x0=False, final_sigmas_type="sigma_min", **ZERO_SNR), 10),
    (dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=1, solver_type="bh1", prediction_type="sample"), 4),
    (dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=1, lower_order_final=False,
          timestep_spacing="leading", prediction_type="v_prediction", use_karras_sigmas=True), 5)])
def test_unipc_ill_conditioned_noise_prediction(config, steps):
    """predict_x0=False with a sample / v model is ill-conditioned in fp32: eps = (x - alpha m)/sigma at small sigma,
    and alpha_t/alpha_s0 x - sigma_t (e^h - 1) eps cancels terms ~1e3 x the result at large sigma. diffusers' own fp32
    steps are up to 1.6e-3 off its fp64 run and ours differ from its fp32 ones by up to ~1e-3, so 1e-5 parity is out
    of reach. Instead: against diffusers run in fp64, our worst error is at most 4x diffusers' fp32 one."""
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)

    def toy_fp64(x, t, c):
        return ToyModel()(x, torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).double(), c)

    scheduler = UniPCMultistepScheduler(**config)
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(scheduler.config), sample_shape=(3, 8, 8))
    ours = []
    with torch.no_grad():
        ref32 = diffusers_trajectory(UniPCMultistepScheduler(**config), toy_fn, noise, steps, cond)
        ref64 = diffusers_trajectory(UniPCMultistepScheduler(**config), toy_fp64, noise.double(), steps, cond)
        Sampler.from_scheduler(den, scheduler, steps).sample(noise, cond=cond,
                                                             callback=lambda i, x: ours.append(x.clone()))
    ours_err = max(rel_err(a, truth) for a, truth in zip(ours, ref64))
    diffusers_err = max(rel_err(b, truth) for b, truth in zip(ref32, ref64))
    assert ours_err <= 4 * diffusers_err, (ours_err, diffusers_err)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_unipc_fewer_steps_than_order(steps):
    check_parity(UniPCMultistepScheduler, dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), steps)


@pytest.mark.parametrize("config,steps", [(dict(), 10),
                                          (dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min",
                                                disable_corrector=[0]), 16)])
def test_unipc_unet_with_guidance(config, steps):
    check_parity(UniPCMultistepScheduler, dict(**SD, **config), steps, model="unet", guidance_scale=3.0)


def test_unipc_preset_is_the_class_default():
    ours = plan_for("unipc", NoiseSchedule.from_config({}), 10).tables(3.0)
    ref = plan_from_scheduler(UniPCMultistepScheduler(), 10).tables(3.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    midpoint = plan_from_scheduler(UniPCMultistepScheduler(solver_type="midpoint"), 10).tables(3.0)  # diffusers: bh2
    assert all(torch.equal(a, b) for a, b in zip(midpoint, ref))


@pytest.mark.parametrize("config,n_slots", [(dict(), 3), (dict(disable_corrector=list(range(10))), 1),
                                            (dict(solver_order=1, disable_corrector=list(range(10))), 0),
                                            (dict(solver_order=3, lower_order_final=False,
                                                  final_sigmas_type="sigma_min"), 4)])
def test_unipc_history_slots(config, n_slots):
    """Slots: K = the largest model-output lag read (corrector of order p reads M_{i-p}), + 1 for last_sample."""
    assert plan_from_scheduler(UniPCMultistepScheduler(**config), 10).n_slots == n_slots


@pytest.mark.parametrize("option,value", [("thresholding", True), ("use_exponential_sigmas", True),
                                          ("use_beta_sigmas", True), ("use_flow_sigmas", True),
                                          ("solver_p", "ddim"), ("solver_order", 4)])
def test_unipc_refused_options(option, value):
    value = DDIMScheduler() if value == "ddim" else value
    with pytest.raises(NotImplementedError, match=option):
        plan_from_scheduler(UniPCMultistepScheduler(**{option: value}), 8)


def test_unipc_flow_prediction_refused():
    with pytest.raises(NotImplementedError, match="flow_prediction"):
        plan_from_scheduler(UniPCMultistepScheduler(prediction_type="flow_prediction"), 8,
                            schedule=NoiseSchedule.from_config({}))


@pytest.mark.parametrize("config,match", [(dict(solver_type="bh1"), "bh1"), (dict(predict_x0=False), "predict_x0"),
                                          (dict(lower_order_final=False), "lower_order_final"),
                                          (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3,
                                                lower_order_final=False), "non-finite")])
def test_unipc_configs_diffusers_turns_to_nan(config, match):
    """These give NaN at diffusers' last step (final sigma 0: h infinite; Karras + sigma_min repeats the last sigma:
    h = 0): we refuse them rather than diverge."""
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            last = diffusers_trajectory(UniPCMultistepScheduler(**config), toy_fn, noise, 8, torch.zeros(1))[-1]
            assert not torch.isfinite(last).all()
        except torch.linalg.LinAlgError:
            pass
    with pytest.raises(ValueError, match=match):
        plan_from_scheduler(UniPCMultistepScheduler(**config), 8)


@pytest.mark.parametrize("begin", [1, 3, 6])
@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, disable_corrector=[4]),
                                    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")])
def test_unipc_begin_restarts_like_set_begin_index(config, begin):
    """Step option ``begin``: the plan of a loop started at that index (img2img), where diffusers' UniPC starts its
    warm-up afresh and runs no corrector first; every step <= 1e-5 of diffusers' with set_begin_index."""
    check_begin(dict(SD, **config), begin)


def check_begin(config: dict, begin: int, steps: int = 8) -> None:
    """diffrt's plan with ``begin`` against diffusers' UniPC (``config``) started there by set_begin_index, from the
    same sample: the timesteps equal, every step <= 1e-5; a begin past the grid is refused."""
    scheduler = UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(begin)
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(begin))
    x, expected = start.clone(), []
    for t in scheduler.timesteps[begin:]:
        x = scheduler.step(toy_fn(x, t, None), t, x).prev_sample
        expected.append(x)
    plan = plan_from_scheduler(UniPCMultistepScheduler(**config), steps, begin=begin)
    assert plan.timesteps().double().tolist() == scheduler.timesteps[begin:].double().tolist()
    sampler = Sampler.from_plan(Denoiser(ToyModel(), NoiseSchedule.from_config(config), sample_shape=(3, 8, 8)), plan)
    state = sampler.start(start)
    for i in range(sampler.steps):
        x_in, t = sampler.model_inputs(state)
        sampler.step(state, sampler.denoiser(x_in, t, None))
        assert rel_err(state.x, expected[i]) <= 1e-5, f"step {begin + i}"
    with pytest.raises(ValueError, match=f"begin must index one of the {steps} steps"):
        plan_from_scheduler(UniPCMultistepScheduler(**config), steps, begin=steps)


# --- flow sigmas (use_flow_sigmas + flow_prediction): Wan 2.1 / 2.2 ----------------------------------------------

# Wan2.1-T2V's scheduler config (flow_shift 3.0 for 480p; WanPipeline's docs: 5.0 for 720p)
WAN = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
           prediction_type="flow_prediction", predict_x0=True, solver_type="bh2", lower_order_final=True,
           use_flow_sigmas=True, flow_shift=3.0, timestep_spacing="linspace", final_sigmas_type="zero")


@pytest.mark.parametrize("steps", [4, 10, 20])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_unipc_flow_sigmas(shift, order, final, steps):
    """Every step <= 1e-5 of diffusers' (the toy model's output is the velocity), and the plan's model timesteps
    are the scheduler's int64 ones (int(s T), the first level lowered by 1e-6 from 1)."""
    config = dict(WAN, flow_shift=shift, solver_order=order, final_sigmas_type=final)
    scheduler = UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    assert plan_from_scheduler(UniPCMultistepScheduler(**config), steps).timesteps().tolist() == \
        scheduler.timesteps.double().tolist()
    check_parity(UniPCMultistepScheduler, config, steps)


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("extra", [dict(solver_type="bh1", final_sigmas_type="sigma_min"),
                                   dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
                                   dict(lower_order_final=False, final_sigmas_type="sigma_min"),
                                   dict(solver_order=3, disable_corrector=[2, 5]),
                                   dict(timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True)])
def test_unipc_flow_solver_options(extra, steps):
    """The solver's options on flow sigmas; the VP grid's (spacing, offset, zero SNR) change nothing there."""
    check_parity(UniPCMultistepScheduler, dict(WAN, **extra), steps)


@pytest.mark.parametrize("config,steps", [(WAN, 4), (dict(WAN, flow_shift=5.0, solver_order=3), 8)])
def test_unipc_flow_unet_with_guidance(config, steps):
    check_parity(UniPCMultistepScheduler, config, steps, model="unet", guidance_scale=5.0)


def check_flow_grid_parity(config: dict, steps: int, grid: dict) -> list[float]:
    """Our plan (``grid``: set_timesteps' sigmas / mu, as the stand-in passes them) against diffusers' loop after
    set_timesteps(steps, **grid)."""
    reference = UniPCMultistepScheduler(**config)
    reference.set_timesteps = lambda n: UniPCMultistepScheduler.set_timesteps(reference, n, **grid)
    noise, cond = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    den = Denoiser(ToyModel(), NoiseSchedule.from_config(reference.config), sample_shape=(3, 8, 8))
    sampler = Sampler.from_scheduler(den, UniPCMultistepScheduler(**config), steps, **grid)
    ours = []
    with torch.no_grad():
        ref = diffusers_trajectory(reference, toy_fn, noise, steps, cond)
        sampler.sample(noise, cond=cond, callback=lambda i, x: ours.append(x.clone()))
    assert sampler.plan.timesteps().tolist() == reference.timesteps.double().tolist()
    errors = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert len(ours) == len(ref) == steps and max(errors) <= 1e-5, errors
    return errors


@pytest.mark.parametrize("steps", [1, 4, 12])
@pytest.mark.parametrize("config,grid", [
    (dict(WAN, use_dynamic_shifting=True), dict(mu=0.8)),
    (dict(WAN, use_dynamic_shifting=True, time_shift_type="linear", solver_order=3), dict(mu=1.6)),
    (dict(WAN, shift_terminal=0.1, final_sigmas_type="sigma_min"), {}),
    (dict(WAN, use_dynamic_shifting=True, shift_terminal=0.05), dict(mu=1.2)),
    (WAN, dict(mu=3.0)),  # mu without use_dynamic_shifting: ignored, as diffusers ignores it
    (dict(WAN, flow_shift=5.0), "custom"),
    (dict(WAN, use_dynamic_shifting=True, solver_order=3), "custom-mu")])
def test_unipc_flow_grid_options(config, grid, steps):
    """Dynamic shifting (mu: exponential, linear), the shift_terminal stretch and custom sigmas (float64 and
    float32 arrays: the grid keeps their dtype, as diffusers' does)."""
    if steps == 1 and config.get("shift_terminal"):  # 1 - s_0 = 0: diffusers' stretch is 0 / 0
        scheduler = UniPCMultistepScheduler(**config)
        with np.errstate(divide="ignore", invalid="ignore"):
            scheduler.set_timesteps(steps, **grid)
        assert not torch.isfinite(scheduler.sigmas[:-1]).all()
        with pytest.raises(ValueError, match="not finite"):
            plan_from_scheduler(UniPCMultistepScheduler(**config), steps, **grid)
    elif grid in ("custom", "custom-mu"):
        for dtype in (np.float64, np.float32):
            custom = dict(sigmas=np.linspace(1.0, 0.05, steps).astype(dtype))
            check_flow_grid_parity(config, steps, {**custom, **({"mu": 0.9} if grid == "custom-mu" else {})})
    else:
        check_flow_grid_parity(config, steps, grid)


@pytest.mark.parametrize("begin", [1, 3, 6])
@pytest.mark.parametrize("config", [dict(WAN), dict(WAN, flow_shift=5.0, solver_order=3, disable_corrector=[4]),
                                    dict(WAN, solver_order=2, lower_order_final=False, final_sigmas_type="sigma_min"),
                                    dict(WAN, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")])
def test_unipc_flow_begin_restarts_like_set_begin_index(config, begin):
    """``begin`` on flow sigmas (img2img / video2video): diffusers' UniPC restarts its warm-up there, no corrector
    first; every step <= 1e-5 of diffusers' with set_begin_index."""
    check_begin(config, begin)


@pytest.mark.parametrize("config,error,match", [
    (dict(WAN, prediction_type="epsilon"), NotImplementedError, "use_flow_sigmas=True with prediction_type='epsilon'"),
    (dict(WAN, prediction_type="v_prediction"), NotImplementedError, "use_flow_sigmas=True with prediction_type"),
    (dict(WAN, predict_x0=False, final_sigmas_type="sigma_min"), NotImplementedError, "predict_x0=False"),
    (dict(WAN, use_karras_sigmas=True), NotImplementedError, "use_karras_sigmas"),
    (dict(WAN, use_dynamic_shifting=True), ValueError, "needs mu"),
    (dict(WAN, solver_type="bh1"), ValueError, "bh1"),  # final sigma 0: NaN in diffusers' last step, as on VP
    (dict(WAN, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), ValueError, "non-finite"),
    (dict(SD, use_dynamic_shifting=True), NotImplementedError, "use_dynamic_shifting"),
    (dict(WAN, thresholding=True), NotImplementedError, "thresholding")])
def test_unipc_flow_refused(config, error, match):
    with pytest.raises(error, match=match):
        plan_from_scheduler(UniPCMultistepScheduler(**config), 8)


def test_unipc_flow_refuses_a_vp_denoiser_and_vp_refuses_flow_arguments():
    with pytest.raises(ValueError, match="flow-matching denoiser"):
        plan_from_scheduler(UniPCMultistepScheduler(**WAN), 8, schedule=NoiseSchedule.from_config(SD))
    with pytest.raises(ValueError, match="custom sigmas need use_flow_sigmas"):
        plan_from_scheduler(UniPCMultistepScheduler(**SD), 4, sigmas=np.linspace(1.0, 0.1, 4))
    vp = plan_from_scheduler(UniPCMultistepScheduler(**SD), 6).tables(3.0)  # mu without dynamic shifting: ignored
    assert all(torch.equal(a, b) for a, b in zip(vp, plan_from_scheduler(UniPCMultistepScheduler(**SD), 6, mu=1.0).tables(3.0)))
