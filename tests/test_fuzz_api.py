"""Property-based tests (hypothesis) over the public Python API: whatever the arguments, a call ends in a
documented exception (ValueError, TypeError, NotImplementedError) or a finite result of the right shape, and the
next good call still works. The CI variants draw a few dozen examples each; ``DIFFRT_FUZZ_LONG=1`` runs the
``fuzz_long`` variants with many more (README, Tests)."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffrt.kernels import attention  # noqa: E402
from diffrt.runtime import Sampler, models, optimize  # noqa: E402
from diffrt.runtime.solvers import PRESETS  # noqa: E402

DOCUMENTED = (ValueError, TypeError, NotImplementedError)
CI = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow], derandomize=True)
LONG = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
DIT = models.load("digits-dit")

# small values that run (quickly), huge ones that must be refused before any work, and wrong types
numbers = st.one_of(st.integers(-5, 8), st.sampled_from([10**6, 2**40]), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=4))
solver_names = st.one_of(st.sampled_from(sorted(PRESETS)), st.text(max_size=12))


def _good_sample() -> torch.Tensor:
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return Sampler(DIT, "ddim", 2, guidance_scale=2.0).sample(noise, cond=torch.arange(2),
                                                              uncond=torch.full((2,), models.NULL_CLASS))


def _sampler_property(solver, steps, guidance, batch, labels):
    try:
        sampler = Sampler(DIT, solver, steps, guidance_scale=guidance)
        cond = torch.tensor(labels[:batch] or [0])
        noise = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        uncond = None if guidance is None else torch.full((batch,), models.NULL_CLASS)
        with torch.no_grad():
            x = sampler.sample(noise, cond=cond, uncond=uncond)
    except DOCUMENTED:
        pass
    else:
        assert x.shape == noise.shape and torch.isfinite(x).all()
    assert torch.isfinite(_good_sample()).all()


sampler_args = dict(solver=solver_names, steps=numbers,
                    guidance=st.one_of(st.none(), st.floats(-5, 10), numbers), batch=st.integers(1, 3),
                    labels=st.lists(st.integers(-2, 12), max_size=4))


@CI
@given(**sampler_args)
def test_sampler_arguments(solver, steps, guidance, batch, labels):
    _sampler_property(solver, steps, guidance, batch, labels)


@pytest.mark.fuzz_long
@LONG
@given(**sampler_args)
def test_sampler_arguments_long(solver, steps, guidance, batch, labels):
    _sampler_property(solver, steps, guidance, batch, labels)


dims = st.integers(1, 5)


@CI
@given(batch=dims, lq=st.integers(1, 40), lk=st.integers(1, 40), heads=dims, head_dim=st.sampled_from([1, 8, 40, 72]),
       k_batch=dims, dtype=st.sampled_from([torch.float32, torch.float16, torch.int32]),
       scale=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_attention_arguments(batch, lq, lk, heads, head_dim, k_batch, dtype, scale):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, lq, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(k_batch, lk, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(k_batch, lk, heads, head_dim, generator=gen).to(dtype)
    try:
        out = attention(q, k, v, scale=scale)
    except DOCUMENTED:
        return
    assert out.shape == q.shape and dtype.is_floating_point
    if scale is None or math.isfinite(scale):
        assert torch.isfinite(out.float()).all()


@CI
@given(dtype=st.one_of(st.none(), st.sampled_from([torch.float32, torch.bfloat16]), numbers),
       attention_backend=st.one_of(st.sampled_from(["auto", "torch", "reference", None]), st.text(max_size=6)),
       todo=st.one_of(st.none(), st.booleans(), st.integers(-1, 4), numbers),
       step_cache=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), numbers))
def test_optimize_arguments(dtype, attention_backend, todo, step_cache):
    try:
        fast = optimize(DIT, dtype=dtype, attention=attention_backend, todo=todo, step_cache=step_cache)
    except DOCUMENTED:
        pass
    else:
        noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            x = Sampler(fast, "ddim", 2).sample(noise, cond=torch.arange(2))
        assert x.shape == noise.shape and torch.isfinite(x).all()
    assert torch.isfinite(_good_sample()).all()
