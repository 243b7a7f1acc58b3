"""Shared helpers for parity tests against diffusers schedulers."""
from __future__ import annotations

import inspect
import math

import torch

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler

TOL = 1e-5  # fp32 relative error allowed at every step (issue 2)


class ToyModel(torch.nn.Module):
    """An analytic, smooth, nonlinear denoiser: m = 0.7 tanh(x) + 0.2 x cos(t/100) + 0.05 cond."""

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        out = 0.7 * torch.tanh(x) + 0.2 * x * torch.cos(t / 100.0)
        if cond is not None:
            out = out + 0.05 * cond.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return out


def tiny_unet(seed: int = 0, num_class_embeds: int | None = 10):
    """A tiny random diffusers UNet2DModel (3x8x8, class-conditional)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_class_embeds).eval()


def diffusers_trajectory(scheduler, model_fn, noise, steps, cond=None, uncond=None, guidance_scale=None,
                         generator=None, **step_kwargs):
    """Run the canonical diffusers sampling loop; returns the sample after every step."""
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have no initial scale
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = {"generator": generator, **step_kwargs}
    traj = []
    for t in scheduler.timesteps:
        x_in = scale(x, t)
        if guidance_scale is not None:
            out = model_fn(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            m = u + guidance_scale * (c - u)
        else:
            m = model_fn(x_in, t, cond)
        x = scheduler.step(m, t, x, **step_kwargs).prev_sample
        traj.append(x)
    return traj


def toy_fn(x, t, cond):
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    return ToyModel()(x, t, cond)


def unet_fn(unet):
    def fn(x, t, cond):
        with torch.no_grad():
            return unet(x, t, class_labels=cond).sample
    return fn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (inf when either is non-finite)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_parity(scheduler_cls, config: dict, steps: int, model: str = "toy", guidance_scale=None, seed=0,
                 stochastic=False, tol=TOL, step_kwargs=None, batch=2):
    """Assert our sampler reproduces the diffusers loop for ``scheduler_cls(**config)`` at every step."""
    return check_scheduler_parity(lambda: scheduler_cls(**config), steps, model, guidance_scale, seed, stochastic, tol,
                                  step_kwargs, batch)


def check_scheduler_parity(make_scheduler, steps: int, model: str = "toy", guidance_scale=None, seed=0,
                           stochastic=False, tol=TOL, step_kwargs=None, batch=2):
    """Assert our sampler reproduces the diffusers loop for the scheduler ``make_scheduler()`` builds (called
    twice: one for diffusers' loop, a fresh one for ``Sampler.from_scheduler``) at every step."""
    step_kwargs = step_kwargs or {}
    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, 8, 8, generator=gen)
    cond = torch.arange(batch) % 10
    uncond = torch.full_like(cond, 9) if guidance_scale is not None else None
    if model == "toy":
        fn = toy_fn
        den = Denoiser(ToyModel(), NoiseSchedule.from_config(scheduler.config), sample_shape=(3, 8, 8))
    else:
        unet = tiny_unet(seed)
        fn = unet_fn(unet)
        den = Denoiser.from_diffusers(unet, scheduler.config)
    g_ref = torch.Generator().manual_seed(1234) if stochastic else None
    with torch.no_grad():
        ref = diffusers_trajectory(scheduler, fn, noise, steps, cond, uncond, guidance_scale, g_ref, **step_kwargs)
    sampler = Sampler.from_scheduler(den, make_scheduler(), steps, guidance_scale=guidance_scale, **step_kwargs)
    ours = []
    g_ours = torch.Generator().manual_seed(1234) if stochastic else None
    with torch.no_grad():
        sampler.sample(noise, cond=cond, uncond=uncond, generator=g_ours, callback=lambda i, x: ours.append(x.clone()))
    assert len(ours) == len(ref), f"{len(ours)} steps vs diffusers' {len(ref)}"
    errors = [rel_err(a, b) for a, b in zip(ours, ref)]
    worst = max(range(len(errors)), key=lambda i: errors[i])
    assert errors[worst] <= tol, f"step {worst}: relative error {errors[worst]:.3g} > {tol} (all: {errors})"
    return errors
