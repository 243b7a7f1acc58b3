"""optimize(): diffrt attention inside the reference DiT and diffusers models (UNet2DModel,
UNet2DConditionModel, DiTTransformer2DModel, Flux), ToDo and sparse placement, and refusals."""
from __future__ import annotations

import logging

import pytest
import torch
from diffrt.kernels import KVDownsample
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler, models, optimize
from diffrt.runtime import attention as runtime_attention
from diffrt.runtime import context
from diffrt.runtime.attention import Sparse, ToDo

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def _inputs(batch=2, channels=1, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=gen), torch.tensor([800.0, 150.0][:batch]),
            torch.tensor([3, models.NULL_CLASS][:batch]))


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


@pytest.fixture(scope="module")
def unet():
    return models.load("digits-unet")


@pytest.fixture
def spy(monkeypatch):
    """Records the kv_downsample / block_mask of every attention call the processors make."""
    calls = []
    real = runtime_attention.attention

    def record(q, k, v, scale=None, kv_downsample=None, block_mask=None, backend="auto"):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "down": kv_downsample, "mask": block_mask})
        return real(q, k, v, scale=scale, kv_downsample=kv_downsample, block_mask=block_mask, backend=backend)

    monkeypatch.setattr(runtime_attention, "attention", record)
    return calls


@torch.no_grad()
def test_dit_exact_attention_and_the_original_keeps_working(dit, spy):
    x, t, y = _inputs()
    before = dit(x, t, y)
    fast = optimize(dit, attention="torch")
    assert len(fast.layers) == dit.model.num_blocks and fast.prediction_type == dit.prediction_type
    assert torch.equal(fast(x, t, y), before)
    assert len(spy) == dit.model.num_blocks and all(call["down"] is None for call in spy)
    spy.clear()
    assert torch.equal(dit(x, t, y), before) and not spy  # the plain denoiser does not go through diffrt


@torch.no_grad()
def test_dit_triton_kernel_inside_the_model(dit):
    x, t, y = _inputs()
    torch.testing.assert_close(optimize(dit, attention="triton")(x, t, y), dit(x, t, y), rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["nearest", "average"])
def test_dit_todo_downsamples_its_8x8_grid(dit, spy, mode):
    x, t, y = _inputs()
    todo = ToDo(factor=2, min_tokens=0, mode=mode)
    out = optimize(dit, attention="triton", todo=todo)(x, t, y)
    assert [call["down"] for call in spy] == [KVDownsample((8, 8), 2, mode)] * dit.model.num_blocks
    reference = optimize(dit, attention="reference", todo=todo)(x, t, y)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert (out - dit(x, t, y)).abs().max() > 1e-3  # ToDo changes the prediction
    spy.clear()
    optimize(dit, todo=2)(x, t, y)  # the paper's default needs >= 4096 tokens: not on 64
    assert all(call["down"] is None for call in spy)


@torch.no_grad()
def test_dit_sparse_window_and_dynamic(dit, spy):
    x, t, y = _inputs()
    window = Sparse("window", radius=1, q_block=16, k_block=16, min_tokens=0)
    out = optimize(dit, attention="triton", sparse=window)(x, t, y)
    mask = spy[0]["mask"]
    assert mask is not None and 0 < mask.density < 1 and spy[1]["mask"] is mask  # built once per grid
    torch.testing.assert_close(out, optimize(dit, attention="reference", sparse=window)(x, t, y), rtol=1e-4, atol=1e-4)
    spy.clear()
    dynamic = Sparse("dynamic", tau=0.5, q_block=16, k_block=16, min_similarity=0.0, min_tokens=0)
    optimize(dit, sparse=dynamic)(x, t, y)
    assert spy[0]["mask"].active.shape == (2, 4, 4, 4)


@torch.no_grad()
def test_unet2d_levels(unet, spy):
    """digits-unet has attention at 8x8 (level 1) and 4x4 (level 2) only: ToDo(2) leaves it exact."""
    x, t, y = _inputs()
    before = unet(x, t, y)
    assert torch.equal(optimize(unet, attention="torch", todo=ToDo(2, min_tokens=0))(x, t, y), before)
    spy.clear()
    out = optimize(unet, attention="triton", todo=ToDo({1: 2}, min_tokens=0))(x, t, y)
    downs = {call["q"][1]: call["down"] for call in spy}
    assert downs == {64: KVDownsample((8, 8), 2), 16: None}
    assert (out - before).abs().max() > 1e-4


def _tiny_cross_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=8, norm_num_groups=8).eval()


@torch.no_grad()
def test_unet2d_condition_cross_attention_is_never_downsampled(spy):
    den = Denoiser.from_diffusers(_tiny_cross_unet(), SCHEDULE)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t, text = torch.tensor([500.0, 20.0]), torch.randn(2, 77, 24, generator=torch.Generator().manual_seed(2))
    before = den(x, t, text)
    torch.testing.assert_close(optimize(den, attention="triton")(x, t, text), before, rtol=1e-4, atol=1e-4)
    spy.clear()
    optimize(den, todo=ToDo(2, min_tokens=256))(x, t, text)
    by_keys = {}
    for call in spy:
        by_keys.setdefault(call["k"][1], set()).add(call["down"])
    # self-attention at 16x16 (level 0) downsampled; cross-attention over 77 text tokens and the 8x8 mid block not
    assert by_keys == {256: {KVDownsample((16, 16), 2)}, 77: {None}, 64: {None}}


@torch.no_grad()
def test_dit_transformer2d_uses_its_patch_grid(spy):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()
    den = Denoiser.from_diffusers(model, SCHEDULE)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    before = den(x, t, y)
    assert torch.equal(optimize(den, attention="torch")(x, t, y), before)
    spy.clear()
    optimize(den, todo=ToDo(2, min_tokens=0))(x, t, y)
    assert [call["down"] for call in spy] == [KVDownsample((8, 8), 2)] * 2


@torch.no_grad()
def test_flux_joint_attention_runs_through_diffrt(spy):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).eval()
    layers = runtime_attention.install(model)
    assert {layer.kind for layer in layers} == {"joint", "self"}
    gen = torch.Generator().manual_seed(4)
    inputs = {"hidden_states": torch.randn(1, 16, 8, generator=gen),
              "encoder_hidden_states": torch.randn(1, 7, 24, generator=gen),
              "pooled_projections": torch.randn(1, 12, generator=gen), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3), "return_dict": False}
    before = model(**inputs)[0]
    assert not spy
    with context.switches(attention=(runtime_attention.AttentionSettings("triton"), None)):
        fused = model(**inputs)[0]
    assert len(spy) == 2 and spy[0]["q"] == (1, 23, 2, 16)  # 7 text + 16 image tokens, attended jointly
    torch.testing.assert_close(fused, before, rtol=1e-4, atol=1e-4)


def test_sampler_runs_on_the_optimized_denoiser(dit):
    fast = optimize(dit, todo=ToDo(2, min_tokens=0))
    labels = torch.tensor([0, 7])
    noise = torch.randn(2, *dit.sample_shape, generator=torch.Generator().manual_seed(5))
    x = Sampler(fast, "dpmpp-2m", 4, guidance_scale=3.0).sample(noise, cond=labels,
                                                                 uncond=torch.full_like(labels, models.NULL_CLASS))
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_refusals_say_what_to_change(dit, caplog):
    plain = Denoiser(torch.nn.Conv2d(1, 1, 3, padding=1), NoiseSchedule.from_config(SCHEDULE), call=lambda m, x, t, c: m(x))
    with pytest.raises(ValueError, match="Conv2d has no attention layers"):
        optimize(plain, todo=2)
    with caplog.at_level(logging.INFO, logger="diffrt.runtime.optimized"):
        assert optimize(plain).settings is None
    assert "attention left as it is" in caplog.text
    with pytest.raises(ValueError, match="cuda_graphs=True and step_cache do not compose"):
        optimize(dit, cuda_graphs=True, step_cache=0.1)
    with pytest.raises(NotImplementedError, match="the engine replays its own graphs"):
        optimize(dit, cuda_graphs=True, backend="onnxruntime")
    with pytest.raises(ValueError, match="attention must be None or one of"):
        optimize(dit, attention="flash")
    with pytest.raises(TypeError, match="todo must be"):
        optimize(dit, todo="yes")
    with pytest.raises(ValueError, match="todo and sparse run inside diffrt's attention"):
        optimize(dit, attention=None, todo=2)
    with pytest.raises(ValueError, match="kind must be"):
        Sparse("random")


def test_custom_processors_and_huge_heads_are_refused():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    model = torch.nn.Sequential(Attention(query_dim=32, heads=2, dim_head=16, processor=Custom()))
    with pytest.raises(ValueError, match="Custom is not one diffrt reproduces"):
        runtime_attention.install(model)
    wide = torch.nn.Sequential(Attention(query_dim=32, heads=1, dim_head=320))
    with pytest.raises(ValueError, match="head dim 320 > 256"):
        runtime_attention.install(wide)


def test_dtype_conversion_copies_the_model(dit):
    fast = optimize(dit, dtype=torch.bfloat16)
    assert fast.model is not dit.model and next(fast.model.parameters()).dtype == torch.bfloat16
    assert next(dit.model.parameters()).dtype == torch.float32
    assert optimize(dit).model is dit.model


def test_cuda_graphs_wraps_the_model_call_and_is_eager_off_cuda(dit):
    from diffrt.runtime.graphs import GraphDenoiser

    graphed, plain = optimize(dit, cuda_graphs=True), optimize(dit)
    assert isinstance(graphed, GraphDenoiser) and graphed.pad_batches
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.full((3,), 400.0), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(graphed(x, t, y), plain(x, t, y), rtol=1e-5, atol=1e-5)  # padded to 4 rows
