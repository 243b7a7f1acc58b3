"""Layer early exit for the digits DiT: the training script on a small budget, threshold 0 = the full
model, a high threshold exits at the first head, and the blocks saved are counted."""
import pytest
import torch
from diffrt.runtime import Sampler, models
from diffrt.runtime.models import exits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The DiT with heads trained for a few steps (seeded), saved and loaded back like the shipped ones."""
    import shutil

    folder = tmp_path_factory.mktemp("weights")
    for name in ("digits-dit.json", "digits-dit.safetensors"):
        shutil.copy(models.WEIGHTS_DIR / name, folder / name)
    den = models.load("digits-dit", weights_dir=folder)
    heads, record = exits.train_exit_heads(den.model, den.schedule, every=2, steps=3, batch_size=8, progress=False)
    exits.save_exit_heads(heads, record, folder)
    return models.load("digits-dit", weights_dir=folder), heads, record, folder


def test_training_is_seeded_and_saved(trained):
    den, heads, record, folder = trained
    assert record["depths"] == [2, 4] and record["steps"] == 3
    assert models.card("digits-dit", folder)["exit_heads"]["file"] == exits.EXITS_FILE
    loaded = den.model.exit_heads
    assert loaded is not None and loaded.depths == [2, 4]
    again, _ = exits.train_exit_heads(models.load("digits-dit").model, den.schedule, every=2, steps=3, batch_size=8,
                                      progress=False)
    for (name, a), (_, b) in zip(heads.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(den.model.state_dict()) == set(models.load("digits-dit").model.state_dict())  # heads kept apart


def _sample(den, early_exit):
    labels = torch.arange(4)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0, early_exit=early_exit)
    x = sampler.sample(noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))
    return x, sampler.stats.get("early_exit")


def test_threshold_zero_is_the_full_model_and_one_exits_first(trained):
    den, *_ = trained
    full, _ = _sample(den, None)
    never, stats = _sample(den, 0.0)
    assert torch.equal(never, full) and stats["blocks_saved_fraction"] == 0 and stats["exits"] == {6: 5}
    first, stats = _sample(den, 1.0)
    assert stats["exits"] == {2: 5} and stats["blocks_saved_fraction"] == pytest.approx(1 - 2 / 6)
    assert not torch.equal(first, full)


def test_early_exit_needs_heads_and_a_threshold():
    with pytest.raises(ValueError, match="exit heads"):
        Sampler(models.load("digits-unet"), "ddim", 4, early_exit=0.1)
    den = models.load("digits-dit")
    den.model.attach_exit_heads(exits.ExitHeads(den.model, 3))
    with pytest.raises(ValueError, match="threshold in"):
        Sampler(den, "ddim", 4, early_exit=2.0)
    with pytest.raises(ValueError, match="no exit before the last"):
        exits.ExitHeads(den.model, 6)
