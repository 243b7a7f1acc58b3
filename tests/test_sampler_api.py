"""The Sampler's step API and preset solvers behave as sample() does."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.solvers import PRESETS
from parity import ToyModel


def _den(flow: bool = False) -> Denoiser:
    schedule = NoiseSchedule.from_config({"shift": 3.0}) if flow else NoiseSchedule.linear()
    return Denoiser(ToyModel(), schedule, sample_shape=(3, 8, 8))


@pytest.mark.parametrize("solver", sorted(PRESETS))
def test_every_preset_samples_finite_and_deterministic(solver):
    sampler = Sampler(_den(solver.startswith("flow")), solver, 6, guidance_scale=2.0)
    noise = torch.randn(2, 3, 8, 8)
    cond, uncond = torch.tensor([1, 2]), torch.tensor([9, 9])
    a = sampler.sample(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, noise * sampler.plan.init_noise_sigma)


def test_step_api_equals_sample():
    sampler = Sampler(_den(), "dpmpp-2m", 7)
    noise, cond = torch.randn(2, 3, 8, 8), torch.tensor([3, 4])
    expected = sampler.sample(noise, cond=cond)
    state = sampler.start(noise)
    for _ in range(sampler.steps):
        x_in, t = sampler.model_inputs(state)
        assert t.shape == (2,)
        sampler.step(state, sampler.denoiser(x_in, t, cond))
    assert int(state.step) == sampler.steps
    assert torch.equal(state.x, expected)


def test_guidance_folds_like_explicit_cfg():
    """CFG in the table equals running the solver on u + g (c - u) computed outside."""
    den = _den()
    noise, cond, uncond = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([9, 9])
    guided = Sampler(den, "unipc", 6, guidance_scale=3.0).sample(noise, cond=cond, uncond=uncond)
    plain = Sampler(den, "unipc", 6)
    state = plain.start(noise)
    for _ in range(plain.steps):
        x_in, t = plain.model_inputs(state)
        u, c = den(x_in, t, uncond), den(x_in, t, cond)
        plain.step(state, u + 3.0 * (c - u))
    assert ((guided - state.x).abs().max() / state.x.abs().max()).item() < 1e-6


def test_generator_list_draws_per_sample():
    sampler = Sampler(_den(), "euler-ancestral", 4)
    noise = torch.randn(2, 3, 8, 8)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    both = sampler.sample(noise, cond=torch.tensor([0, 0]), generator=gens)
    first = sampler.sample(noise[:1], cond=torch.tensor([0]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(both[:1], first)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sampler.sample(noise, generator=[torch.Generator()] * 3)


class _OpLog(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ["heun", "euler", "ddim", "dpmpp-2m-sde"])
@pytest.mark.parametrize("guided", [False, True])
def test_a_cpu_step_is_the_model_and_one_kernel_call(solver, guided):
    """With the C++ step, the loop runs no torch op of its own per step: the input scaling (c_in x) and the CFG batch
    [x; x] are written by the step kernel, the step index advances inside it. Counted as the aten ops of a whole
    sample at two step counts: only the model's, CFG's split of its output and the noise drawn up front grow with the
    steps."""
    prediction = torch.randn(4, 3, 8, 8)
    den = Denoiser(lambda x, t, cond=None: prediction[: x.shape[0]] * 1.0, NoiseSchedule.linear(), sample_shape=(3, 8, 8))
    noise = torch.randn(2, 3, 8, 8)
    conditions = {"cond": torch.zeros(2, 5), "uncond": torch.ones(2, 5)} if guided else {}
    counts = {}
    for steps in (4, 8):
        sampler = Sampler(den, solver, steps, guidance_scale=2.0 if guided else None, backend="cpu")
        sampler.sample(noise, check=False, generator=torch.Generator().manual_seed(0), **conditions)  # prepared
        with _OpLog() as log:
            sampler.sample(noise, check=False, generator=torch.Generator().manual_seed(0), **conditions)
        evaluations = sampler.steps
        model_ops = {"aten.slice.Tensor": evaluations, "aten.mul.Tensor": evaluations}  # the model's own
        if guided:
            model_ops["aten.split.Tensor"] = evaluations  # the CFG halves of the model output (views)
        draws = sampler.plan.n_noise  # a stochastic solver's step noise, drawn in start(), one draw per row
        log.ops.subtract({**model_ops, "aten.select.int": draws, "aten.normal_.default": draws})
        counts[steps] = {op: n for op, n in log.ops.items() if n}
    assert counts[4] == counts[8], f"per-step ops outside the model: {counts}"
