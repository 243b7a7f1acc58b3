"""INT8 calibration per timestep group, W8A8 layers, per-sample scales, and optimize(int8=...)."""
from __future__ import annotations

import json

import pytest
import torch
from diffrt.export import Calibration, QuantPolicy, calibrate, model_hash
from diffrt.export import calibration as calibrate_module
from diffrt.export import quant
from diffrt.kernels.int8_spec import int8_linear_reference, quantize_weight
from diffrt.runtime import Sampler, context, models, optimize, quality

STEPS = 4
LABELS = torch.arange(10)
NULL = torch.tensor([models.NULL_CLASS])


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


@pytest.fixture(scope="module")
def calibration(dit):
    return calibrate(dit, "dpmpp-2m", STEPS, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="steps",
                     method="mse", progress=False)


def _sample(den, steps=STEPS, seed=7):
    noise = torch.randn(len(LABELS), *den.sample_shape, generator=torch.Generator().manual_seed(seed))
    return Sampler(den, "dpmpp-2m", steps, guidance_scale=3.0).sample(noise, cond=LABELS,
                                                                       uncond=NULL.expand(len(LABELS)))


def test_default_policy_keeps_embeddings_modulation_and_the_edges(dit):
    names = QuantPolicy().select(dit.model)
    assert "blocks.0.attn.qkv" in names and "blocks.5.mlp.2" in names and "blocks.3.attn.proj" in names
    assert not any("adaLN" in n or "embedder" in n or "final_layer" in n for n in names)
    assert len(names) == 4 * dit.model.num_blocks
    custom = QuantPolicy(include=("blocks.0.adaLN_modulation.1",), exclude=("blocks.5.*",)).select(dit.model)
    assert "blocks.0.adaLN_modulation.1" in custom and not any(n.startswith("blocks.5.") for n in custom)


def test_groups_and_clipping_rules():
    ranges = {"a": [torch.tensor([1.0]), torch.tensor([1.1]), torch.tensor([3.0]), torch.tensor([3.2])]}
    assert calibrate_module._groups(ranges, 4, "steps", 0.25) == [0, 1, 2, 3]
    assert calibrate_module._groups(ranges, 4, 1, 0.25) == [0, 0, 0, 0]
    assert calibrate_module._groups(ranges, 4, 2, 0.25) == [0, 0, 1, 1]
    assert calibrate_module._groups(ranges, 4, "auto", 0.25) == [0, 0, 1, 1]
    assert calibrate_module._groups(ranges, 4, "auto", 5.0) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups must be"):
        calibrate_module._groups(ranges, 4, 9, 0.25)
    values = torch.cat([torch.rand(5000, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0])])
    assert calibrate_module._clip(values, 50.0, "max", 99.0) == 50.0
    assert calibrate_module._clip(values, 50.0, "percentile", 99.0) < 1.0
    assert calibrate_module._clip(values, 50.0, "mse", 99.0) < 50.0  # one outlier is not worth the range


def test_calibration_covers_every_step_and_is_deterministic(dit, calibration):
    assert calibration.step_groups == list(range(STEPS)) and calibration.groups == STEPS
    assert set(calibration.scales) == set(QuantPolicy().select(dit.model))
    assert all(s.shape == (STEPS,) and (s > 0).all() for s in calibration.scales.values())
    again = calibrate(dit, "dpmpp-2m", STEPS, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="steps",
                      method="mse", progress=False)
    assert all(torch.equal(again.scales[n], s) for n, s in calibration.scales.items())
    qkv = calibration.scales["blocks.0.attn.qkv"]
    assert qkv.max() / qkv.min() > 1.05  # ranges change with the timestep


def test_groups_of_picks_the_nearest_plan_timestep(calibration):
    timesteps = torch.tensor(calibration.timesteps)
    mixed = torch.stack([timesteps[2], timesteps[0] - 0.4, timesteps[3] + 1.0])
    assert calibration.groups_of(mixed).tolist() == [2, 0, 3]


def test_rows_use_their_samples_scale():
    """A batch mixing timestep groups: sample b's rows are quantized with scales[group[b]]."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    scales = torch.tensor([0.01, 0.05, 0.2])
    weights = quant.install(torch.nn.Sequential(layer), {"0": (scales, None)})
    x = torch.randn(3, 5, 24, generator=gen)
    group_ids = torch.tensor([2, 0, 1])
    with context.switches(int8=(group_ids, "static", weights)):
        out = layer(x)
    w_q, w_scale = quantize_weight(layer.weight)
    for b in range(3):
        row_scale = scales[group_ids[b]].expand(5)
        expected = int8_linear_reference(x[b], w_q, w_scale, row_scale, layer.bias.detach())
        torch.testing.assert_close(out[b], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # outside: float
    with context.switches(int8=(group_ids, "static", {})):  # another variant's call, without this layer
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias"}
    quant.unpatch(layer)
    assert not quant.is_patched(layer) and "forward" not in layer.__dict__


def test_1x1_conv_rows_are_pixels():
    gen = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(8, 6, 1)
    x = torch.randn(2, 8, 3, 4, generator=gen)
    scale = x.abs().max() / 127
    quant.patch(conv)
    with context.switches(int8=(torch.tensor([0, 0]), "static", {conv: quant.prepare(conv, scale.reshape(1))})):
        out = conv(x)
    w_q, w_scale = quantize_weight(conv.weight)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = int8_linear_reference(rows, w_q, w_scale, scale.expand(24), conv.bias.detach())
    torch.testing.assert_close(out, expected.reshape(2, 3, 4, 6).permute(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be W8A8"):
        quant.prepare(torch.nn.Conv2d(8, 6, 3), torch.tensor([0.02]))


def test_save_load_and_refusals(dit, calibration, tmp_path):
    path = calibration.save(tmp_path / "dit-int8")
    document = json.loads(path.read_text())
    assert document["model_hash"] == model_hash(dit.model) and document["step_groups"] == list(range(STEPS))
    loaded = Calibration.load(tmp_path / "dit-int8")
    assert loaded.timesteps == calibration.timesteps and loaded.meta["method"] == "mse"
    assert all(torch.equal(loaded.scales[n], s) for n, s in calibration.scales.items())
    fast = optimize(dit, int8=str(tmp_path / "dit-int8"))
    with pytest.raises(ValueError, match="made for a 4-step plan"):
        Sampler(fast, "dpmpp-2m", STEPS + 1, guidance_scale=3.0)
    other = models.load("digits-dit")
    with torch.no_grad():
        other.model.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="made for model"):
        optimize(other, int8=loaded)
    with pytest.raises(FileNotFoundError, match="missing"):
        Calibration.load(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a diffrt INT8 calibration"):
        Calibration.load(tmp_path / "bad")


@pytest.mark.parametrize("smoothquant", [None, 0.5])
def test_int8_sampling_end_to_end(dit, calibration, smoothquant):
    cal = calibration if smoothquant is None else calibrate(
        dit, "dpmpp-2m", STEPS, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="auto", method="mse",
        smoothquant=smoothquant, progress=False)
    reference = _sample(dit)
    fast = optimize(dit, int8=cal)
    assert len(fast.int8_layers) == 24 and "int8 (static" in fast.describe()
    samples = _sample(fast)
    psnr = quality.psnr(samples, reference)
    assert psnr.min() > 25, psnr
    assert quality.class_accuracy(samples, LABELS) >= quality.class_accuracy(reference, LABELS) - 0.1
    assert torch.equal(_sample(dit), reference)  # the float denoiser is untouched
    assert (samples - reference).abs().max() > 0  # and the int8 path did run


def test_two_int8_variants_of_one_model_coexist(dit, calibration):
    shared = calibrate(dit, "dpmpp-2m", STEPS, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups=1,
                       method="max", progress=False)
    per_step, one_set = optimize(dit, int8=calibration), optimize(dit, int8=shared)
    first = _sample(per_step)
    _sample(one_set)
    assert torch.equal(_sample(per_step), first)  # the second optimize() did not replace the first's scales
    assert not torch.equal(_sample(one_set), first)


def test_dynamic_mode_needs_no_calibration(dit):
    fast = optimize(dit, int8="dynamic")
    assert fast.calibration is None and fast.int8_mode == "dynamic"
    psnr = quality.psnr(_sample(fast), _sample(dit))
    assert psnr.min() > 25, psnr
    with pytest.raises(TypeError, match="int8 must be a Calibration"):
        optimize(dit, int8=3)


def test_calibrate_rejects_bad_arguments(dit):
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(dit, cond=LABELS, method="minmax")
    with pytest.raises(ValueError, match="needs cond"):
        calibrate(dit)
    with pytest.raises(ValueError, match="alpha in"):
        calibrate(dit, cond=LABELS, smoothquant=1.5)


def test_speed_policy_keeps_only_layers_that_gain(dit):
    from diffrt.export.speed import LayerSpeed, measure_layers, speed_policy

    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t, y = torch.full((4,), 500.0), torch.tensor([1, 2, 3, 10])
    patched_before = [quant.is_patched(m) for m in dit.model.modules()]
    speeds = measure_layers(dit, x, t, y, repeats=2)
    assert [s.name for s in speeds] == QuantPolicy().select(dit.model)
    assert all(s.float_ms > 0 and s.int8_ms > 0 and s.rows == 4 * 64 for s in speeds)
    assert [quant.is_patched(m) for m in dit.model.modules()] == patched_before  # the model is left as it was
    measured = [LayerSpeed("blocks.0.attn.qkv", 256, 256, 768, 1.0, 2.0), LayerSpeed("blocks.0.mlp.0", 256, 256, 512,
                                                                                       2.0, 1.0)]
    chosen = speed_policy(measured).select(dit.model)
    assert "blocks.0.attn.qkv" not in chosen and "blocks.0.mlp.0" in chosen
