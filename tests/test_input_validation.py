"""The runtime's entry points validate before working: plans with repeated noise levels, conditions of the
wrong batch or out-of-range class labels, ToDo / Sparse / step-cache values, guidance, backends, dtypes and
long messages; each ends in a clear error, and the next good call still works."""
import math

import numpy as np
import pytest
import torch

from diffrt.runtime import Sampler, models, optimize
from diffrt.runtime.attention import Sparse, ToDo
from diffrt.runtime.solvers import plan_for


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


def _sample(sampler, batch=2, cond=None, uncond=None):
    cond = torch.arange(batch) if cond is None else cond
    uncond = torch.full((batch,), models.NULL_CLASS) if uncond is None else uncond
    return sampler.sample(torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(0)), cond=cond,
                          uncond=uncond)


def test_a_grid_that_repeats_a_noise_level_is_refused_not_nan(dit):
    with pytest.raises(ValueError, match="non-finite coefficient.*fewer steps"):
        Sampler(dit, "dpmpp-2m", 1000)
    x = _sample(Sampler(dit, "dpmpp-2m", 3, guidance_scale=2.0))  # the next good one
    assert torch.isfinite(x).all()


def test_messages_stay_short_for_huge_step_counts(dit):
    for solver in ("ddim", "euler", "dpmpp-2m", "unipc", "pndm", "flow-euler", "lcm"):
        with pytest.raises((ValueError, NotImplementedError)) as error:
            plan_for(solver, dit.schedule, 10**6)
        assert len(str(error.value)) < 500, (solver, len(str(error.value)))


@pytest.mark.parametrize("cond,message", [(torch.arange(3), "3 rows for 2 samples"),
                                          (torch.tensor([0, 11]), "class labels 0..11"),
                                          (torch.tensor([-1, 2]), "class labels -1..2")])
def test_conditions_are_checked_before_the_model_runs(dit, cond, message):
    sampler = Sampler(dit, "ddim", 3, guidance_scale=2.0)
    with pytest.raises(ValueError, match=message):
        _sample(sampler, cond=cond)
    assert torch.isfinite(_sample(sampler)).all()


def test_one_condition_for_all_samples_is_fine(dit):
    x = _sample(Sampler(dit, "ddim", 3, guidance_scale=2.0), batch=3, cond=torch.tensor([4]),
                uncond=torch.tensor([models.NULL_CLASS]))
    assert x.shape == (3, 1, 16, 16)


@pytest.mark.parametrize("make", [lambda: ToDo(factor=0), lambda: ToDo(factor={0: 0}), lambda: ToDo(mode="max"),
                                  lambda: ToDo(min_tokens=-1), lambda: Sparse(radius=0), lambda: Sparse(tau=0.0),
                                  lambda: Sparse(topk=1.5), lambda: Sparse(q_block=0)])
def test_attention_options_out_of_range_are_refused(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("value", [float("nan"), -0.1, math.inf, "0.05"])
def test_step_cache_values(dit, value):
    with pytest.raises((ValueError, TypeError), match="step_cache"):
        optimize(dit, step_cache=value)


@pytest.mark.parametrize("kwargs,error", [({"guidance_scale": "3"}, ValueError),
                                          ({"guidance_scale": math.nan}, ValueError),
                                          ({"guidance_scale": True}, ValueError),
                                          ({"backend": "gpu"}, ValueError)])
def test_sampler_options(dit, kwargs, error):
    with pytest.raises(error):
        Sampler(dit, "ddim", 3, **kwargs)
    assert Sampler(dit, "ddim", 3, guidance_scale=np.float32(2.0)).guidance_scale == 2.0  # numpy numbers are numbers


def test_optimize_dtype_must_be_a_torch_dtype(dit):
    with pytest.raises(TypeError, match="torch.dtype"):
        optimize(dit, dtype="fp16")
