import pytest
from diffusers import DDIMScheduler

from parity import check_parity


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_ddim_options(spacing, offset, ptype):
    check_parity(DDIMScheduler, dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype,
                                     beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_clip_and_final_alpha(clip, set_alpha_to_one):
    check_parity(DDIMScheduler, dict(clip_sample=clip, set_alpha_to_one=set_alpha_to_one, clip_sample_range=0.8), 12)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("clipped_out", [False, True])
def test_ddim_eta_stochastic(eta, clipped_out):
    check_parity(DDIMScheduler, dict(), 8, stochastic=True,
                 step_kwargs=dict(eta=eta, use_clipped_model_output=clipped_out))


def test_ddim_unet_with_guidance():
    check_parity(DDIMScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False), 10, model="unet", guidance_scale=3.0)


def test_ddim_thresholding_refused():
    with pytest.raises(NotImplementedError, match="thresholding"):
        check_parity(DDIMScheduler, dict(thresholding=True), 4)
