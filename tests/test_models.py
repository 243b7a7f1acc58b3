"""The shipped reference models: loading, shapes, the DiT's early exit, config round-trip, errors,
and a small sampling check of the shipped DiT against its model card."""
from __future__ import annotations

import pytest
import torch
from diffrt.runtime import Denoiser, Sampler, models, quality
from diffrt.runtime.models import baselines
from diffrt.runtime.models.dit import DigitsDiT

NAMES = ("digits-dit", "digits-unet")


@pytest.fixture(scope="module")
def dit() -> Denoiser:
    return models.load("digits-dit")


def test_available_and_unknown_name():
    assert models.available() == list(NAMES)
    assert models.NULL_CLASS == 10
    with pytest.raises(ValueError, match="digits-dit, digits-unet"):
        models.load("digits-vae")


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="models.train --model digits-dit"):
        models.load("digits-dit", weights_dir=tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_load_shapes_and_card(name):
    den = models.load(name)
    card = models.card(name)
    assert isinstance(den, Denoiser)
    assert den.sample_shape == (1, 16, 16)
    assert den.prediction_type == card["scheduler"]["prediction_type"] == "v_prediction"
    assert den.schedule.num_train_timesteps == 1000
    assert card["parameters"] == sum(p.numel() for p in den.model.parameters())
    assert card["scheduler"]["beta_schedule"] == "linear" and card["null_class"] == models.NULL_CLASS
    assert not any(p.requires_grad for p in den.model.parameters())
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 500.0, 10.0])
    with torch.no_grad():
        out = den(x, t, torch.tensor([0, 7, models.NULL_CLASS]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_guided_sampling_runs(name):
    den = models.load(name, dtype=torch.bfloat16)
    labels = torch.tensor([3, 8])
    noise = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    x = Sampler(den, "dpmpp-2m", 3, guidance_scale=3.0).sample(
        noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_weights_fit_the_package_budget():
    total = sum(p.stat().st_size for p in models.WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 15e6, f"shipped weights take {total / 1e6:.1f} MB"


def test_dit_early_exit(dit):
    model = dit.model
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([600.0, 200.0]), torch.tensor([1, 4])
    with torch.no_grad():
        outs = [model(x, t, y, depth=k) for k in range(1, model.num_blocks + 1)]
        full = model(x, t, y)
    assert torch.equal(full, outs[-1])
    for k in range(1, len(outs)):
        assert (outs[k] - outs[k - 1]).abs().max() > 1e-4, f"depth {k + 1} equals depth {k}"
    for bad in (0, model.num_blocks + 1):
        with pytest.raises(ValueError, match="depth"):
            model(x, t, y, depth=bad)


def test_dit_null_class_is_the_default(dit):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        assert torch.equal(dit.model(x, t), dit.model(x, t, torch.full((2,), models.NULL_CLASS)))


def test_dit_config_round_trip(dit):
    cfg = dit.model.config
    rebuilt = DigitsDiT.from_config(cfg)
    assert rebuilt.config == cfg == models.card("digits-dit")["architecture"]["config"]
    rebuilt.load_state_dict(dit.model.state_dict())
    small = DigitsDiT(hidden_size=64, num_blocks=3, num_heads=2)
    assert DigitsDiT.from_config(small.config).config == small.config
    assert sum(p.numel() for p in DigitsDiT.from_config(small.config).parameters()) == \
        sum(p.numel() for p in small.parameters())
    with pytest.raises(TypeError, match="unknown DigitsDiT config"):
        DigitsDiT(hidden=64)


def _card_row(name: str, solver: str, steps: int, guidance_scale: float) -> dict:
    rows = models.card(name)["baselines"]["rows"]
    return next(r for r in rows if (r["solver"], r["steps"], r["guidance_scale"], r["extra"]) ==
                (solver, steps, guidance_scale, False))


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_classified_as_the_card_claims(name):
    """30 fresh samples (3 per class, other seeds than the card's), DPM-Solver++(2M) 10 steps, CFG 3:
    the classifier's accuracy within a sampling tolerance of the card's 1000-sample figure."""
    den = models.load(name)
    claimed = _card_row(name, "dpmpp-2m", 10, 3.0)["class_accuracy"]
    labels = torch.arange(10).repeat(3)
    noise = torch.randn(len(labels), *den.sample_shape, generator=torch.Generator().manual_seed(123))
    x = Sampler(den, "dpmpp-2m", 10, guidance_scale=3.0).sample(
        noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))
    assert (x.abs() > 1.1).double().mean() < 0.01, "samples should be pixels in [-1, 1]"
    accuracy = quality.class_accuracy(x, labels)
    assert accuracy >= claimed - 0.15, f"{name}: accuracy {accuracy:.2f} on 30 samples, the card claims {claimed:.2f}"


@pytest.mark.parametrize("name", NAMES)
def test_card_holds_the_measured_baselines(name):
    entry = models.card(name)["baselines"]
    assert entry["samples"] >= quality.FID_MIN_SAMPLES and entry["fid_floor"] > 0
    measured = [(r["solver"], r["steps"], r["options"], r["guidance_scale"], r["extra"]) for r in entry["rows"]]
    assert measured == baselines.grid()
    for row in entry["rows"]:
        assert 0 <= row["class_accuracy"] <= 1 and row["digits_fid"] > 0
        assert row["ratio_to_floor"] == pytest.approx(row["digits_fid"] / entry["fid_floor"], rel=1e-2)
    assert entry["goals"] == baselines.goals(entry["rows"])


def test_baseline_labels_are_balanced():
    assert torch.equal(torch.bincount(baselines.balanced_labels(30)), torch.full((10,), 3))
    with pytest.raises(ValueError, match="multiple of 10"):
        baselines.balanced_labels(25)
