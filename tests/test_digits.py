"""The digits data and the shipped digits classifier (diffrt.runtime.models.digits)."""
import pytest
import torch
from diffrt.runtime.models import digits


def test_data_shapes_range_and_split_sizes():
    images, labels = digits.load_digits("all")
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() <= 1.0
    train, heldout = digits.load_digits("train"), digits.load_digits("heldout")
    assert len(train[0]) == 1500 and len(heldout[0]) == 297
    counts = torch.bincount(heldout[1], minlength=10)
    assert counts.min().item() >= 29 and counts.max().item() <= 30  # stratified


def test_upsampling_is_bilinear_without_corner_alignment():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = torch.tensor(sklearn_digits().images[:3], dtype=torch.float32)[:, None] / 16
    expected = torch.nn.functional.interpolate(raw, scale_factor=2, mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(digits.load_digits("all")[0][:3], expected)


def test_split_is_deterministic_disjoint_and_complete():
    train_idx, heldout_idx = digits.split_indices()
    assert set(train_idx.tolist()).isdisjoint(heldout_idx.tolist())
    assert sorted(train_idx.tolist() + heldout_idx.tolist()) == list(range(1797))
    digits.split_indices.cache_clear()
    again = digits.split_indices()
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], heldout_idx)
    images, labels = digits.load_digits("all")
    held_images, held_labels = digits.load_digits("heldout")
    assert torch.equal(held_images, images[heldout_idx]) and torch.equal(held_labels, labels[heldout_idx])


def test_load_digits_returns_copies_and_rejects_unknown_splits():
    a, _ = digits.load_digits("train")
    a.fill_(0)
    assert digits.load_digits("train")[0].min().item() == -1.0
    with pytest.raises(ValueError, match="train, heldout, all"):
        digits.load_digits("test")


def test_shipped_classifier_matches_its_card():
    card = digits.classifier_card()
    model = digits.load_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    claimed = card["metrics"]["heldout_accuracy"]
    assert claimed >= 0.97
    images, labels = digits.load_digits("heldout")
    with torch.no_grad():
        logits = model(images)
        feats = model.features(images)
    assert logits.shape == (297, 10) and feats.shape == (297, card["features"]["dim"])
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    assert accuracy == pytest.approx(claimed, abs=0.005)  # same data, same weights: only float noise
    subset = torch.arange(0, 297, 3)  # a small sample: the claim within a sampling tolerance
    assert (logits[subset].argmax(1) == labels[subset]).double().mean().item() >= claimed - 0.05


def test_missing_weights_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits-classifier.safetensors"):
        digits.load_classifier(weights_dir=tmp_path)


def test_classifier_rejects_wrong_shapes():
    model = digits.DigitsClassifier()
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        model(torch.zeros(2, 1, 8, 8))


def test_training_is_deterministic_and_saved_weights_round_trip(tmp_path):
    first, card = digits.train_classifier(seed=3, steps=2, progress=False)
    second, _ = digits.train_classifier(seed=3, steps=2, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert card["training"]["steps"] == 2 and card["training"]["seed"] == 3
    assert {"architecture", "data", "metrics", "parameters"} <= card.keys()
    digits.save_classifier(first, card, tmp_path)
    loaded = digits.load_classifier(weights_dir=tmp_path)
    assert digits.classifier_card(tmp_path)["weights"]["file"] == "digits-classifier.safetensors"
    x = digits.load_digits("heldout")[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), first(x), rtol=0, atol=0)


def test_missing_scikit_learn_names_the_test_extra(monkeypatch):
    import sys

    digits._all_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match="install the `test` extra"):
            digits.load_digits("heldout")
    finally:
        digits._all_digits.cache_clear()
