"""calibrate() refuses every bad option before the model runs: a ValueError / TypeError naming the option,
and zero model calls (counted by a forward pre-hook on the denoiser's model)."""
import math

import pytest
import torch
from diffrt.export import calibrate
from diffrt.runtime import models
from diffrt.runtime.denoiser import Denoiser

LABELS = torch.arange(4)
NULL = torch.tensor([models.NULL_CLASS])
GOOD = dict(solver="ddim", steps=2, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="steps", progress=False)


class CountingDenoiser:
    """A digits DiT whose model counts its forward calls."""

    def __init__(self):
        self.den = models.load("digits-dit")
        self.calls = 0
        self.den.model.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        self.calls += 1


@pytest.fixture(scope="module")
def counting():
    return CountingDenoiser()


def _refused(counting, error, match, **changes):
    """calibrate with GOOD but ``changes`` raises ``error`` matching ``match`` and never calls the model."""
    before = counting.calls
    with pytest.raises(error, match=match):
        calibrate(counting.den, **{**GOOD, **changes})
    assert counting.calls == before, "the model ran before the option was refused"


def test_good_options_run_the_model(counting):
    before = counting.calls
    calibration = calibrate(counting.den, **GOOD)
    assert counting.calls > before and calibration.groups == 2


@pytest.mark.parametrize("solver,steps,match", [
    ("no-such-solver", 2, "unknown solver"),
    ("ddim", 0, "num_inference_steps"),
    ("ddim", -3, "num_inference_steps"),
    ("ddim", 2.5, "num_inference_steps"),
    ("ddim", 10**9, "steps"),
])
def test_solver_and_steps_use_the_samplers_checks(counting, solver, steps, match):
    _refused(counting, ValueError, match, solver=solver, steps=steps)


def test_unknown_solver_option_is_refused(counting):
    before = counting.calls
    with pytest.raises((TypeError, NotImplementedError)):
        calibrate(counting.den, **GOOD, no_such_option=1)
    assert counting.calls == before


@pytest.mark.parametrize("value", [math.nan, math.inf, "3", True, [3.0]])
def test_guidance_scale(counting, value):
    _refused(counting, ValueError, "guidance_scale", guidance_scale=value)


@pytest.mark.parametrize("value", [(), [], "01", (1.5,), (True,), (-1,), 7, None, torch.tensor([0, 1])])
def test_seeds(counting, value):
    _refused(counting, ValueError, "seeds", seeds=value)


@pytest.mark.parametrize("value", [0, -1, 3, 2.0, True, "all", None, "Steps"])
def test_groups(counting, value):
    _refused(counting, ValueError, "groups", groups=value)


@pytest.mark.parametrize("value", ["min", "MSE", None, 1])
def test_method(counting, value):
    _refused(counting, ValueError, "method", method=value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, math.nan, "0.5", True])
def test_smoothquant(counting, value):
    _refused(counting, ValueError, "smoothquant", smoothquant=value)


@pytest.mark.parametrize("value", [0, -0.1, math.inf, math.nan, None, "0.25"])
def test_tolerance(counting, value):
    _refused(counting, ValueError, "tolerance", tolerance=value)


@pytest.mark.parametrize("option,value", [("percentile", 0), ("percentile", 101), ("percentile", math.nan),
                                          ("batch_size", 0), ("batch_size", 2.0), ("seed", -1), ("seed", "0")])
def test_other_numbers(counting, option, value):
    _refused(counting, ValueError, option, **{option: value})


@pytest.mark.parametrize("uncond", [torch.full((3,), models.NULL_CLASS), torch.tensor(models.NULL_CLASS)])
def test_uncond_rows_must_match_cond(counting, uncond):
    _refused(counting, ValueError, "uncond", uncond=uncond)


def test_guidance_needs_uncond(counting):
    _refused(counting, ValueError, "uncond", uncond=None)


@pytest.mark.parametrize("cond,error", [(None, ValueError), (torch.tensor([], dtype=torch.long), ValueError),
                                        (torch.tensor(3), ValueError), ([object()], TypeError)])
def test_cond(counting, cond, error):
    _refused(counting, error, "cond", cond=cond)


def test_class_labels_out_of_range_refused_before_the_first_batch(counting):
    labels = torch.tensor([0, 1, 2, 99])  # the bad label sits in the second batch
    _refused(counting, ValueError, "class labels", cond=labels, batch_size=2)


def test_denoiser_must_be_a_denoiser_around_a_module(counting):
    with pytest.raises(TypeError, match="den must be"):
        calibrate(counting.den.model, **GOOD)
    plain = Denoiser(lambda x, t, c=None: x, counting.den.schedule, sample_shape=(1, 16, 16))
    with pytest.raises(TypeError, match="den.model"):
        calibrate(plain, **GOOD)
