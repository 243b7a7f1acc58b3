"""FusedScheduler on its own: it presents the real scheduler's interface (signatures pipelines inspect, outputs
indexable and by name), runs diffrt's plan step by step exactly as diffusers' loop would, stochastic steps
included, and hands anything it does not reproduce to diffusers' own step."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffrt.runtime.fused_scheduler import FusedScheduler  # noqa: E402
from parity import rel_err, toy_fn  # noqa: E402

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _loop(scheduler, steps: int, seed: int = 0, **step_kwargs):
    """A pipeline's loop: set_timesteps, scale_model_input, model, step (generator seeded per run)."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * getattr(scheduler, "init_noise_sigma", 1.0)
    cond = torch.arange(2)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(toy_fn(x_in, t, cond), t, x, **kwargs, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name,config,step_kwargs", [
    ("DDIMScheduler", SD, {"eta": 0.7}), ("EulerAncestralDiscreteScheduler", SD, {}),
    ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("HeunDiscreteScheduler", SD, {}), ("PNDMScheduler", {**SD, "skip_prk_steps": True}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {})])
def test_the_fused_loop_is_diffusers_loop(name, config, step_kwargs):
    make = lambda: getattr(diffusers, name)(**config)  # noqa: E731
    reference = _loop(make(), 6, **step_kwargs)
    fused = FusedScheduler(make())
    ours = _loop(fused, 6, **step_kwargs)
    assert fused.fallback is None
    assert rel_err(ours, reference) <= 1e-5


def test_it_presents_the_real_signatures_and_outputs():
    fused = FusedScheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert "sigmas" in inspect.signature(fused.set_timesteps).parameters  # FluxPipeline checks for it
    assert "set_begin_index" in dir(type(fused)) or hasattr(fused, "set_begin_index")
    assert not hasattr(FusedScheduler(diffusers.PNDMScheduler()), "set_begin_index")  # as PNDM itself
    fused.set_timesteps(4)
    x, m = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = fused.step(m, fused.timesteps[0], x)
    assert torch.equal(out[0], out.prev_sample)
    fused.set_timesteps(4)
    assert isinstance(fused.step(m, fused.timesteps[0], x, return_dict=False), tuple)
    assert fused.config.shift == 3.0 and fused.order == 1  # everything else is the scheduler's


def test_lcm_returns_its_denoised_sample_too():
    fused, real = FusedScheduler(diffusers.LCMScheduler(**SD)), diffusers.LCMScheduler(**SD)
    for s in (fused, real):
        s.set_timesteps(4)
    x, m = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = real.timesteps[-1]  # the last step: no noise
    for s in (fused, real):
        s.set_begin_index(3) if hasattr(s, "set_begin_index") else None
    ours, theirs = fused.step(m, t, x, return_dict=False), real.step(m, t, x, return_dict=False)
    assert len(ours) == 2 and rel_err(ours[1], theirs[1]) <= 1e-6 and rel_err(ours[0], theirs[0]) <= 1e-6


def test_a_scheduler_without_a_plan_runs_its_own_step(caplog, monkeypatch):
    from diffrt.runtime import fused_scheduler

    monkeypatch.setattr(fused_scheduler, "_LOGGED", set())  # logged once per process: whatever ran before
    fused = FusedScheduler(diffusers.DDPMScheduler(**SD))
    with caplog.at_level("WARNING"):
        fused.set_timesteps(4)
    assert "DDPMScheduler" in fused.fallback and "own step" in caplog.text
    x, m = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    real = diffusers.DDPMScheduler(**SD)
    real.set_timesteps(4)
    t = real.timesteps[-1]
    assert torch.equal(fused.step(m, t, x).prev_sample, real.step(m, t, x).prev_sample)


def test_isinstance_answers_for_the_wrapped_scheduler_and_a_foreign_step_signature_falls_back():
    """Pipelines branch on isinstance(self.scheduler, X) (CogVideoX-5b calls CogVideoXDPMScheduler.step with its own
    five positional arguments): the stand-in answers as the scheduler it wraps, and a class diffrt has no plan for
    runs diffusers' own step with the arguments as given (the same outputs as the scheduler alone)."""
    make = lambda: diffusers.CogVideoXDPMScheduler(snr_shift_scale=1.0, timestep_spacing="trailing")  # noqa: E731
    fused, plain = FusedScheduler(make()), make()
    assert isinstance(fused, diffusers.CogVideoXDPMScheduler) and isinstance(fused, FusedScheduler)
    assert not isinstance(FusedScheduler(diffusers.DDIMScheduler()), diffusers.CogVideoXDPMScheduler)
    outputs = []
    for scheduler in (fused, plain):
        scheduler.set_timesteps(4)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        old, previous_t = None, None
        for t in scheduler.timesteps:
            model = toy_fn(x, t, torch.arange(1))
            x, old = scheduler.step(model, old, t, previous_t, x, generator=torch.Generator().manual_seed(3),
                                    return_dict=False)
            previous_t = t
        outputs.append(x)
    assert "CogVideoXDPMScheduler is not supported" in fused.fallback
    assert torch.equal(outputs[0], outputs[1])
