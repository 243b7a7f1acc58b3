"""The quality harness (diffrt.runtime.quality): per-seed metrics, Frechet distance, classifier metrics."""
import logging
import math

import numpy as np
import pytest
import torch
from diffrt.runtime import quality
from diffrt.runtime.models.digits import load_digits


def _batch(seed: int, shape=(4, 1, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------ per-seed metrics
def test_identical_samples_give_infinite_psnr_and_zero_l2():
    x = _batch(0)
    stats = quality.compare_samples(x, x.clone())
    assert stats["samples"] == 4
    assert all(math.isinf(v) and v > 0 for v in stats["psnr"])
    assert stats["psnr_min"] == math.inf and stats["rel_l2_max"] == 0.0 and stats["max_rel_error"] == 0.0


def test_psnr_and_relative_l2_match_their_formulas():
    ref = _batch(1, (3, 2, 5))
    cand = ref.clone()
    cand[0] += 0.1  # MSE 0.01 -> PSNR 10 log10(4 / 0.01)
    cand[1, 0, 0] += 1.0  # one sample changed in one element
    expected_psnr = 10 * math.log10(4 / 0.01)
    got = quality.psnr(cand, ref)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert got[0].item() == pytest.approx(expected_psnr, rel=1e-6)
    assert got[1].item() == pytest.approx(10 * math.log10(4 / (1 / 10)), rel=1e-6)
    assert math.isinf(got[2].item())
    assert quality.psnr(cand, ref, data_range=1.0)[0].item() == pytest.approx(expected_psnr - 20 * math.log10(2))
    rel = quality.relative_l2(cand, ref)
    assert rel[0].item() == pytest.approx(0.1 * math.sqrt(10) / ref[0].double().norm().item(), rel=1e-6)
    assert rel[2].item() == 0.0


def test_relative_l2_of_zero_reference():
    zeros = torch.zeros(2, 3)
    cand = zeros.clone()
    cand[1, 0] = 1.0
    assert quality.relative_l2(cand, zeros).tolist() == [0.0, math.inf]


def test_psnr_mean_leaves_identical_samples_out():
    ref = _batch(4)
    cand = ref.clone()
    cand[0] += 0.1
    stats = quality.compare_samples(cand, ref)
    assert stats["identical"] == 3 and stats["psnr_mean"] == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    assert quality.compare_samples(ref, ref.clone())["psnr_mean"] == math.inf


def test_compare_samples_summary_is_consistent():
    ref, cand = _batch(2), _batch(2) + 0.01 * _batch(3)
    stats = quality.compare_samples(cand, ref)
    assert stats["psnr_min"] <= stats["psnr_mean"] <= stats["psnr_max"]
    assert stats["rel_l2_mean"] == pytest.approx(float(np.mean(stats["rel_l2"])))
    assert 30 < stats["psnr_mean"] < 60


def test_bad_inputs_raise_clear_errors():
    x = _batch(0)
    with pytest.raises(ValueError, match="shapes differ"):
        quality.compare_samples(x, x[:3])
    bad = x.clone()
    bad[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="candidate has 1 non-finite"):
        quality.psnr(bad, x)
    with pytest.raises(ValueError, match="reference has 1 non-finite"):
        quality.relative_l2(x, bad)
    with pytest.raises(ValueError, match="N >= 2"):
        quality.frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="feature dims differ"):
        quality.frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        quality.classifier_features(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="non-finite"):
        quality.digits_fid(bad)


# ------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = quality.gaussian_frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_full_covariances_matches_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # closed form with an independent matrix square root: sigma2^(1/2) sigma1 sigma2^(1/2) (the other order)
    values, vectors = np.linalg.eigh(sigma2)
    root2 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root2 @ sigma1 @ root2)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert quality.gaussian_frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert quality.gaussian_frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_converges_to_the_gaussians_distance():
    gen = torch.Generator().manual_seed(0)
    scale1, scale2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 0.5])
    shift = torch.tensor([0.5, 0.0, -0.5, 0.0])
    a = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * scale1
    b = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * scale2 + shift
    expected = (shift ** 2).sum() + ((scale1 - scale2) ** 2).sum()
    assert quality.frechet_distance(a, b) == pytest.approx(expected.item(), abs=0.05)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    same_distribution = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * scale1
    assert quality.frechet_distance(a, same_distribution) < 0.01


def test_frechet_distance_handles_singular_covariances():
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    feats[:, 3] = 0.0  # a dead ReLU unit
    assert quality.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------- classifier metrics
@pytest.fixture(scope="module")
def heldout():
    return load_digits("heldout")


def test_real_digits_against_themselves_have_zero_fid_and_high_accuracy(heldout):
    images, labels = heldout
    assert quality.digits_fid(images, reference=images.clone()) == pytest.approx(0.0, abs=1e-6)
    assert quality.digits_fid(images) == pytest.approx(0.0, abs=1e-6)  # the default reference is the held-out split
    assert quality.class_accuracy(images, labels) >= 0.97


def test_noise_has_low_accuracy_and_a_large_fid():
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(10).repeat(100)
    assert quality.class_accuracy(noise, labels) < 0.3
    floor = quality.fid_floor()
    assert quality.digits_fid(noise) > 10 * max(floor, 1.0)


def test_fid_floor_is_small_deterministic_and_below_a_shifted_set(caplog):
    floor = quality.fid_floor(seed=0)
    assert floor == quality.fid_floor(seed=0)
    assert 0 < floor
    train, _ = load_digits("train")
    shifted = torch.roll(train[:1000], shifts=2, dims=3)  # plausible strokes, wrong position
    assert quality.digits_fid(shifted) > 2 * floor
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.quality"):
        quality.fid_floor(n_samples=500)
    assert "500 samples (< 1000)" in caplog.text
    with pytest.raises(ValueError, match="n_samples must be in 2..1500"):
        quality.fid_floor(n_samples=5000)


def test_class_accuracy_checks_labels(heldout):
    images, labels = heldout
    with pytest.raises(ValueError, match="labels must be"):
        quality.class_accuracy(images, labels[:10])


def test_quality_report_collects_the_metrics(heldout):
    images, labels = heldout
    report = quality.quality_report(images, images.clone(), labels=labels, name="identity")
    assert report.psnr_min == math.inf and report.rel_l2_max == 0.0
    assert report.class_accuracy == report.baseline_class_accuracy >= 0.97
    assert report.digits_fid is None and report.to_dict()["name"] == "identity"
    assert "class_accuracy=" in report.summary() and "psnr_mean=inf" in report.summary()
