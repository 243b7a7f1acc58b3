"""accelerate(pipe) on real diffusers pipeline classes (tiny random configs): the output equals the original
pipeline's on the same inputs and generator (fp32, relative error <= 1e-5), diffrt's fused step and attention
really ran, a scheduler swapped in later is honoured, and restore() gives the original back bit for bit."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # without it diffusers' pipeline classes are placeholders

import diffusers  # noqa: E402

from diffrt.runtime import accelerate, attention, restore  # noqa: E402
from diffrt.runtime.pipeline import acceleration_of  # noqa: E402
from diffrt.bench.pipelines import FAMILIES, SD_SCHEDULE, build_flux, build_sd3, build_sd15, build_sdxl, relative_error  # noqa: E402

TOL = 1e-5


@pytest.fixture
def fused_attention_calls(monkeypatch):
    """Counts the attention calls diffrt's processors made (the fused path, not the original processor)."""
    calls = []
    original = attention._fused

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "_fused", counting)
    return calls


def _run(pipe, kwargs, seed=0):
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images  # video pipelines return frames


def check_accelerated(pipe, kwargs, calls=None, tol=TOL, **options):
    """Original vs accelerated vs restored on the same inputs; returns the relative error."""
    reference = _run(pipe, kwargs)
    accelerate(pipe, **options)
    fast = _run(pipe, kwargs)
    state = acceleration_of(pipe)
    assert state.fallback is None, f"diffusers' own step ran: {state.fallback}"
    if calls is not None:
        assert calls, "diffrt's attention never ran"
    error = relative_error(fast, reference)
    assert error <= tol, f"relative error {error:.3g} > {tol}"
    restore(pipe)
    assert acceleration_of(pipe) is None and type(pipe) is state.original_class
    assert torch.equal(torch.as_tensor(_run(pipe, kwargs)), torch.as_tensor(reference))  # bit for bit
    return error


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_default_scheduler(family, fused_attention_calls):
    pipe, kwargs = FAMILIES[family]()
    check_accelerated(pipe, kwargs, fused_attention_calls, attention="torch")  # diffrt's processors, even on CPU


@pytest.mark.parametrize("options,steps", [({"flow_shift": 5.0}, 3),  # Wan's 720p shift
                                           ({"solver_order": 3, "final_sigmas_type": "sigma_min"}, 6),
                                           ({"solver_type": "bh1", "final_sigmas_type": "sigma_min",
                                             "disable_corrector": [1]}, 5)])
def test_wan_unipc_flow_options(options, steps, fused_attention_calls):
    """Wan's UniPC on flow sigmas with the options users set (UniPCMultistepScheduler.from_config(..., flow_shift=5.0),
    as WanPipeline's docs): fused, exact."""
    pipe, kwargs = FAMILIES["wan"]()
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, **options)
    kwargs["num_inference_steps"] = steps
    check_accelerated(pipe, kwargs, fused_attention_calls, attention="torch")


def test_wan_unipc_karras_flow_sigmas_run_diffusers_step_and_say_so():
    pipe, kwargs = FAMILIES["wan"]()
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    reference = _run(pipe, kwargs)
    accelerate(pipe)
    assert torch.equal(_run(pipe, kwargs), reference)
    assert "use_karras_sigmas" in acceleration_of(pipe).fallback
    restore(pipe)


def test_auto_attention_off_cuda_leaves_the_models_own(fused_attention_calls):
    """On CPU diffrt's attention would be the same SDPA call the model makes: 'auto' does not install it."""
    pipe, kwargs = build_sdxl()
    check_accelerated(pipe, kwargs)
    assert not fused_attention_calls and not acceleration_of(accelerate(pipe)).fast.layers


# the schedulers users swap in with X.from_config(pipe.scheduler.config), with the options they set
SD_SWAPS = [
    ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("HeunDiscreteScheduler", {}),
    ("UniPCMultistepScheduler", {}), ("DEISMultistepScheduler", {}), ("DDIMScheduler", {}), ("LCMScheduler", {}),
    ("PNDMScheduler", {}), ("LMSDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}), ("DPMSolverSinglestepScheduler", {}), ("TCDScheduler", {}),
]


@pytest.mark.parametrize("name,options", SD_SWAPS, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "default")
def test_sd15_scheduler_swapped_after_accelerate_is_honoured(name, options):
    pipe, kwargs = build_sd15()
    kwargs["guidance_scale"] = 3.0
    swapped = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    pipe.scheduler = swapped
    reference = _run(pipe, kwargs)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    accelerate(pipe)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)  # after accelerate
    fast = _run(pipe, kwargs)
    assert acceleration_of(pipe).fallback is None, acceleration_of(pipe).fallback
    assert relative_error(fast, reference) <= TOL


@pytest.mark.parametrize("name,options", [("EulerAncestralDiscreteScheduler", {}), ("DPMSolverMultistepScheduler",
                                          {"use_karras_sigmas": True}), ("UniPCMultistepScheduler", {}),
                                          ("EDMEulerScheduler", {}), ("EDMDPMSolverMultistepScheduler", {})])
def test_sdxl_scheduler_swaps(name, options):
    pipe, kwargs = build_sdxl()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    check_accelerated(pipe, kwargs)


@pytest.mark.parametrize("build", [build_sd3, build_flux, lambda: build_flux(dev=True)], ids=["sd3", "flux", "flux-dev"])
@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_flow_scheduler_swaps(build, name):
    pipe, kwargs = build()
    if name == "FlowMatchHeunDiscreteScheduler" and "Flux" in type(pipe).__name__:
        pytest.skip("FluxPipeline passes custom sigmas, which FlowMatchHeunDiscreteScheduler does not take (in diffusers)")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    check_accelerated(pipe, kwargs)


def test_decoded_images_match_too():
    pipe, kwargs = build_sd15()
    kwargs.update(output_type="pt", guidance_scale=3.0)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    check_accelerated(pipe, kwargs)


def test_callbacks_still_see_every_step():
    pipe, kwargs = build_sdxl()
    seen = []
    accelerate(pipe)
    _run(pipe, {**kwargs, "callback_on_step_end": lambda p, i, t, k: seen.append((i, k["latents"].shape)) or {}})
    assert [i for i, _ in seen] == list(range(kwargs["num_inference_steps"]))


def test_a_scheduler_no_plan_reproduces_runs_diffusers_step_and_says_so(caplog):
    pipe, kwargs = build_sd15()
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    reference = _run(pipe, kwargs)
    accelerate(pipe)
    with caplog.at_level("WARNING"):
        fast = _run(pipe, kwargs)
    assert "DDPMScheduler" in acceleration_of(pipe).fallback
    assert "runs diffusers' own step" in caplog.text or "DDPMScheduler" in acceleration_of(pipe).fallback
    assert relative_error(fast, reference) <= TOL


def test_accelerate_twice_then_restore_once_gives_the_original():
    pipe, kwargs = build_sd15()
    cls = type(pipe)
    accelerate(pipe, attention="torch")
    accelerate(pipe, attention=None)
    restore(pipe)
    assert type(pipe) is cls and "forward" not in pipe.unet.__dict__
    assert all(type(p).__module__.startswith("diffusers") for p in pipe.unet.attn_processors.values())


def test_the_model_called_directly_or_by_another_pipeline_is_not_accelerated(fused_attention_calls):
    pipe, kwargs = build_sd15()
    twin = type(pipe)(**pipe.components)  # shares the UNet
    reference = _run(twin, kwargs)
    accelerate(pipe, attention="torch")
    pipe.unet(torch.randn(1, 4, 4, 4), 10, encoder_hidden_states=kwargs["prompt_embeds"])
    assert torch.equal(_run(twin, kwargs), reference)
    assert not fused_attention_calls
    _run(pipe, kwargs)
    assert fused_attention_calls


def test_dtype_option_runs_a_converted_copy_and_restore_keeps_the_weights():
    pipe, kwargs = build_sd15()
    weight = pipe.unet.conv_in.weight.detach().clone()
    reference = _run(pipe, kwargs)
    accelerate(pipe, dtype=torch.bfloat16)
    fast = _run(pipe, kwargs)
    assert fast.dtype == reference.dtype and torch.isfinite(fast).all()
    assert 0 < relative_error(fast, reference) < 0.2  # bf16 changes the samples, a little
    restore(pipe)
    assert pipe.unet.conv_in.weight.dtype == torch.float32 and torch.equal(pipe.unet.conv_in.weight, weight)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="diffusers pipeline"):
        accelerate(torch.nn.Linear(2, 2))
    pipe, _ = build_sd15()
    with pytest.raises(ValueError, match="not accelerated"):
        restore(pipe)
    with pytest.raises(NotImplementedError, match="linear_ag"):
        accelerate(pipe, linear_ag=object())
    with pytest.raises(ValueError, match="adaptive_guidance"):
        accelerate(pipe, adaptive_guidance="often")
    assert acceleration_of(pipe) is None


def _uncond_dropped_after_first_call(pipe, cond_first):
    """A forward hook on the plain pipeline's denoiser: from the second call on, the unconditional half of the
    output is the conditional half (what adaptive guidance does once every sample has dropped its pass)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append(1)
        if len(calls) == 1:
            return out
        tensor = out[0] if isinstance(out, tuple) else out.sample
        first, second = tensor.chunk(2)
        both = torch.cat([first, first] if cond_first else [second, second])
        return (both, *out[1:]) if isinstance(out, tuple) else type(out)(sample=both)

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return denoiser.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-alpha", "dit", "sd3"])
def test_adaptive_guidance_in_a_pipeline(family):
    """Threshold above 1: no sample drops its unconditional pass (the exact pipeline). Threshold near -1: every
    sample drops it after the first call, the model then runs the conditional rows only, and the pipeline's
    output is the one of a pipeline whose unconditional predictions are the conditional ones from then on."""
    pipe, kwargs = FAMILIES[family]()
    reference = _run(pipe, kwargs)
    handle = _uncond_dropped_after_first_call(pipe, cond_first=family == "dit")
    dropped = _run(pipe, kwargs)
    handle.remove()
    accelerate(pipe, adaptive_guidance=1.5)
    assert relative_error(_run(pipe, kwargs), reference) <= TOL
    stats = acceleration_of(pipe).guidance_stats
    assert stats["calls"] > 1 and stats["saved_fraction"] == 0
    accelerate(pipe, adaptive_guidance=-0.999)
    assert relative_error(_run(pipe, kwargs), dropped) <= TOL
    stats = acceleration_of(pipe).guidance_stats
    assert stats["saved_fraction"] == pytest.approx(0.5 * (stats["calls"] - 1) / stats["calls"])
    assert relative_error(dropped, reference) > 1e-3  # dropping the unconditional pass changed the samples
    restore(pipe)


def test_sd_config_keys_survive_a_round_of_swaps():
    """A scheduler built from another's config keeps its keys; the pipeline still reproduces diffusers."""
    pipe, kwargs = build_sd15()
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"):
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.get("skip_prk_steps") is True and pipe.scheduler.config["steps_offset"] == SD_SCHEDULE["steps_offset"]
    kwargs["guidance_scale"] = 3.0
    check_accelerated(pipe, kwargs)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                                  "LCMScheduler", "DPMSolverMultistepScheduler", "DEISMultistepScheduler",
                                  "UniPCMultistepScheduler", "LMSDiscreteScheduler", "DPMSolverSinglestepScheduler",
                                  "EDMDPMSolverMultistepScheduler"])
def test_img2img_starts_where_the_strength_says(name, strength):
    """img2img slices the timesteps: with set_begin_index (Euler, Heun, LCM) or without it (DDIM), the plan starts
    at that row; the multistep plans (PNDM, DPM-Solver multistep and singlestep, DEIS, UniPC, LMS, EDM DPM-Solver)
    restart their warm-up there, as diffusers does (fused: no fallback)."""
    pipe, kwargs = FAMILIES["sd15-img2img"]()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    kwargs.update(strength=strength, guidance_scale=3.0)
    check_accelerated(pipe, kwargs)  # asserts that the fused step ran


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux-schnell"])
def test_cuda_graphs_option_routes_the_calls_through_graph_runners(family):
    """Off CUDA the runners call the model eagerly: the flattening of the pipeline's keyword conditions into
    tensors and back must give the exact pipeline."""
    pipe, kwargs = FAMILIES[family]()
    check_accelerated(pipe, kwargs, cuda_graphs=True)
    accelerate(pipe, cuda_graphs=True)
    _run(pipe, kwargs)
    assert acceleration_of(pipe).graphs.runners  # one runner per argument layout
    restore(pipe)
    with pytest.raises(ValueError, match="do not compose"):
        accelerate(pipe, cuda_graphs=True, step_cache=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux-schnell"])
def test_cuda_graphs_replay_the_pipeline_on_cuda(family):
    pipe, kwargs = FAMILIES[family]()
    pipe.to("cuda")
    reference = _run(pipe, kwargs)
    accelerate(pipe, cuda_graphs=True)
    first, second = _run(pipe, kwargs), _run(pipe, kwargs)
    runners = acceleration_of(pipe).graphs.runners
    assert any(runner.timings for runner, _ in runners.values()), "no CUDA graph was captured"
    assert relative_error(first, reference) <= 1e-4 and torch.equal(first, second)
    restore(pipe)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_calls_reuse_the_trajectory_buffers_exactly(name):
    """A pipeline called again with the same plan and latent shape reuses its step buffers and prepared kernel
    (reset: step index, history): every call equals the original pipeline's, also after a call of another shape."""
    pipe, kwargs = build_sd15()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    kwargs["guidance_scale"] = 3.0
    other = dict(kwargs, height=48, width=48)
    references = [_run(pipe, kwargs, 0), _run(pipe, kwargs, 1), _run(pipe, other, 2), _run(pipe, kwargs, 3)]
    accelerate(pipe)
    outputs = [_run(pipe, kwargs, 0), _run(pipe, kwargs, 1), _run(pipe, other, 2), _run(pipe, kwargs, 3)]
    state = acceleration_of(pipe)
    assert state.fallback is None and len(state.step_states) == 2  # one per latent shape, reused
    for fast, reference in zip(outputs, references):
        assert relative_error(fast, reference) <= TOL
    restore(pipe)
