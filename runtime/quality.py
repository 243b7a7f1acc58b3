"""Quality harness: how much an acceleration changes the samples (README, Architecture: "quality is measured, not assumed").

Model-agnostic, per seed (candidate and baseline sampled from the same noise, batch dim 0):

* :func:`psnr` = 10 log10(data_range^2 / mean((c - r)^2)) per sample (inf where identical);
* :func:`relative_l2` = ||c - r||_2 / ||r||_2 per sample;
* :func:`compare_samples`: both per seed, with mean / min / max, and the batch's max-abs
  relative error (:func:`diffrt.runtime.quality_stats.relative_error`); ``psnr_mean`` averages
  the samples that differ (``identical`` counts the others; all identical: inf).

On the shipped digits models (images float [N, 1, 16, 16] in [-1, 1]), through the digits
classifier (:func:`diffrt.runtime.models.digits.load_classifier` unless one is passed):

* :func:`class_accuracy`: fraction of samples the classifier assigns to the class asked for;
* :func:`digits_fid`: Frechet distance between Gaussians fitted to the classifier's penultimate
  features of the samples and of the real held-out digits (297 images), see :func:`frechet_distance`;
  use >= ``FID_MIN_SAMPLES`` = 1000 samples (fewer logs a warning: the distance is biased upward
  at small counts);
* :func:`fid_floor`: the same distance for real digits, ``FID_FLOOR_DEFINITION``.

Images are clamped to [-1, 1] before the classifier (as pipelines do before writing images).
:class:`QualityReport` collects one configuration's numbers for tables and JSON.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import numpy as np
import torch
from diffrt.runtime.quality_stats import relative_error

log = logging.getLogger(__name__)

FID_MIN_SAMPLES = 1000
FID_FLOOR_DEFINITION = (
    "digits-FID of n_samples real digits drawn (seeded, without replacement) from the train split, "
    "against the held-out split: what a generator that reproduces the training distribution perfectly "
    "scores at that sample count (it includes the classifier's train/held-out feature gap and the "
    "finite-sample bias of the 297-image reference)")

__all__ = ["FID_FLOOR_DEFINITION", "FID_MIN_SAMPLES", "QualityReport", "class_accuracy", "classifier_features",
           "compare_samples", "digits_fid", "fid_floor", "frechet_distance", "gaussian_frechet_distance",
           "gaussian_stats", "psnr", "quality_report", "relative_l2"]


# ------------------------------------------------------------------------------------- per-seed metrics
def _paired(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float64 CPU [B, D] (D = all non-batch dims), after checking shapes and finiteness."""
    if candidate.shape != reference.shape:
        raise ValueError(f"candidate and reference shapes differ: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    if candidate.ndim < 1 or candidate.shape[0] == 0:
        raise ValueError(f"expected a batch [B, ...] with B >= 1, got shape {tuple(candidate.shape)}")
    pair = []
    for name, tensor in (("candidate", candidate), ("reference", reference)):
        flat = tensor.detach().to("cpu", torch.float64).reshape(tensor.shape[0], -1)
        bad = (~torch.isfinite(flat)).sum().item()
        if bad:
            raise ValueError(f"{name} has {bad} non-finite values (NaN/inf) in shape {tuple(tensor.shape)}")
        pair.append(flat)
    return pair[0], pair[1]


def psnr(candidate: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, float64 [B], in dB.

    PSNR_b = 10 log10(data_range^2 / MSE_b), MSE_b = mean over the non-batch dims of (c_b - r_b)^2;
    +inf where the samples are identical. ``data_range`` = 2 for pixels in [-1, 1].
    """
    c, r = _paired(candidate, reference)
    mse = (c - r).square().mean(dim=1)
    return 10 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per sample, float64 [B]: ||c_b - r_b||_2 / ||r_b||_2 (0/0 -> 0, x/0 -> inf)."""
    c, r = _paired(candidate, reference)
    diff, norm = (c - r).norm(dim=1), r.norm(dim=1)
    return torch.where(diff == 0, torch.zeros_like(diff), diff / norm)


def compare_samples(candidate: torch.Tensor, baseline: torch.Tensor, data_range: float = 2.0) -> dict[str, Any]:
    """Per-seed comparison of a candidate's samples with the baseline's from the same noise (dim 0 = seed).

    Returns ``samples``, per-seed lists ``psnr`` (dB) and ``rel_l2``, their ``_mean`` / ``_min`` /
    ``_max``, and ``max_rel_error`` = max|c - b| / max|b| over the whole batch. Raises ValueError on
    a shape mismatch or non-finite values.
    """
    per_psnr, per_l2 = psnr(candidate, baseline, data_range), relative_l2(candidate, baseline)
    result: dict[str, Any] = {"samples": len(per_psnr), "psnr": per_psnr.tolist(), "rel_l2": per_l2.tolist()}
    for name, values in (("psnr", per_psnr), ("rel_l2", per_l2)):
        result[f"{name}_mean"] = values.mean().item()
        result[f"{name}_min"] = values.min().item()
        result[f"{name}_max"] = values.max().item()
    finite = per_psnr[torch.isfinite(per_psnr)]
    # a few identical samples (PSNR inf) would make the mean inf: average the others, count them apart
    result["identical"] = int(len(per_psnr) - len(finite))
    result["psnr_mean"] = finite.mean().item() if len(finite) else math.inf
    result["max_rel_error"] = relative_error(candidate, baseline)
    return result


# ---------------------------------------------------------------------------------- classifier metrics
@functools.lru_cache(maxsize=4)
def _shipped_classifier(device: str) -> torch.nn.Module:
    from diffrt.runtime.models.digits import load_classifier  # noqa: PLC0415 - needs the shipped weights

    return load_classifier(device)


def _classifier(classifier: torch.nn.Module | None) -> torch.nn.Module:
    return _shipped_classifier("cpu") if classifier is None else classifier


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: torch.nn.Module | None = None,
                        batch_size: int = 512) -> torch.Tensor:
    """The classifier's penultimate features, float32 CPU [N, F], of images [N, 1, 16, 16].

    Images are clamped to [-1, 1] and moved to the classifier's device in batches of ``batch_size``;
    ``classifier`` is any module with ``features(x) -> [N, F]`` (default: the shipped digits classifier).
    """
    model = _classifier(classifier)
    _check_images(images)
    device = next(model.parameters()).device
    chunks = [model.features(chunk.to(device, torch.float32).clamp(-1, 1)).float().cpu()
              for chunk in images.detach().split(batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module | None = None,
                   batch_size: int = 512) -> float:
    """Fraction of images whose argmax class (by the classifier; default the shipped one) equals ``labels``.

    images float [N, 1, 16, 16] in [-1, 1] (clamped), labels int [N] in 0..9 (the classes asked for).
    """
    model = _classifier(classifier)
    _check_images(images)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] = [{len(images)}] for images {tuple(images.shape)}, "
                         f"got {tuple(labels.shape)}")
    device = next(model.parameters()).device
    predicted = torch.cat([model(chunk.to(device, torch.float32).clamp(-1, 1)).argmax(1).cpu()
                           for chunk in images.detach().split(batch_size)])
    return (predicted == labels.cpu().long()).double().mean().item()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [N, C, H, W] with N >= 1, got {shape}")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"images have {bad} non-finite values (NaN/inf) in shape {tuple(images.shape)}")


# ---------------------------------------------------------------------------------- Frechet distance
def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance [F, F]) of features [N, F] in float64; covariance with 1/(N - 1)."""
    feats = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected features [N, F] with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("features have non-finite values (NaN/inf)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (negative eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def gaussian_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein^2) distance between N(mu1, sigma1) and N(mu2, sigma2), float64:

        d = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    with tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(S sigma2 S)), S = sigma1^(1/2): S sigma2 S is
    symmetric PSD and similar to sigma1 sigma2, so no scipy.linalg.sqrtm and no complex parts are needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian statistics: means {mu1.shape}, {mu2.shape}; "
                         f"covariances {sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(distance, 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, F] and [N_b, F] (float64)."""
    stats_a, stats_b = gaussian_stats(feats_a), gaussian_stats(feats_b)
    if stats_a[0].shape != stats_b[0].shape:
        raise ValueError(f"feature dims differ: {stats_a[0].shape[0]} vs {stats_b[0].shape[0]}")
    return gaussian_frechet_distance(*stats_a, *stats_b)


def _reference_features(reference: str | torch.Tensor, classifier: torch.nn.Module | None) -> torch.Tensor:
    if isinstance(reference, torch.Tensor):
        return classifier_features(reference, classifier)
    if classifier is None:
        return _shipped_reference_features(reference)
    from diffrt.runtime.models.digits import load_digits  # noqa: PLC0415

    return classifier_features(load_digits(reference)[0], classifier)


@functools.lru_cache(maxsize=3)
def _shipped_reference_features(split: str) -> torch.Tensor:
    from diffrt.runtime.models.digits import load_digits  # noqa: PLC0415

    return classifier_features(load_digits(split)[0])


def digits_fid(images: torch.Tensor, classifier: torch.nn.Module | None = None,
               reference: str | torch.Tensor = "heldout") -> float:
    """digits-FID: :func:`frechet_distance` of classifier features, ``images`` vs real digits.

    images float [N, 1, 16, 16] in [-1, 1] (clamped), N >= ``FID_MIN_SAMPLES`` recommended (fewer logs
    a warning). ``reference``: a split of :func:`~diffrt.runtime.models.digits.load_digits`
    ("heldout", the default, 297 images; "train"; "all") or real images [M, 1, 16, 16]. Compare with
    :func:`fid_floor` at the same N.
    """
    _check_images(images)
    if len(images) < FID_MIN_SAMPLES:
        log.warning("digits-FID from %d samples (< %d): the distance is biased upward, compare it only with "
                    "values (and fid_floor) at the same sample count", len(images), FID_MIN_SAMPLES)
    return frechet_distance(classifier_features(images, classifier), _reference_features(reference, classifier))


def fid_floor(seed: int = 0, n_samples: int = FID_MIN_SAMPLES, classifier: torch.nn.Module | None = None) -> float:
    """The real-vs-real digits-FID: ``FID_FLOOR_DEFINITION``.

    = digits_fid(train[perm_seed[:n_samples]], reference="heldout"), perm_seed a torch ``randperm``
    of the 1500 train-split digits from ``torch.Generator().manual_seed(seed)``; 1 < n_samples <= 1500.
    """
    from diffrt.runtime.models.digits import load_digits  # noqa: PLC0415

    images, _ = load_digits("train")
    if not 1 < n_samples <= len(images):
        raise ValueError(f"n_samples must be in 2..{len(images)} (the train split's size), got {n_samples}")
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_samples]
    return digits_fid(images[subset], classifier, reference="heldout")


# ------------------------------------------------------------------------------------------- reports
@dataclasses.dataclass
class QualityReport:
    """One configuration's quality numbers (None where not measured); ``to_dict`` for JSON and tables."""

    name: str
    samples: int
    psnr_mean: float | None = None
    psnr_min: float | None = None
    rel_l2_mean: float | None = None
    rel_l2_max: float | None = None
    max_rel_error: float | None = None
    class_accuracy: float | None = None
    baseline_class_accuracy: float | None = None
    digits_fid: float | None = None
    baseline_digits_fid: float | None = None
    fid_floor: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: the measured fields as name=value."""
        parts = [f"{self.name}: n={self.samples}"]
        for field in dataclasses.fields(self)[2:-1]:
            value = getattr(self, field.name)
            if value is not None:
                parts.append(f"{field.name}={value:.4g}" if math.isfinite(value) else f"{field.name}={value}")
        return " ".join(parts)


def quality_report(candidate: torch.Tensor, baseline: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   classifier: torch.nn.Module | None = None, fid: bool = False, name: str = "candidate",
                   data_range: float = 2.0) -> QualityReport:
    """A :class:`QualityReport` for ``candidate`` samples [N, ...].

    With ``baseline`` (same noise, same shape): the per-seed PSNR / relative-L2 summary. With
    ``labels`` (digits models): class accuracy of candidate (and baseline). With ``fid=True``:
    digits-FID of candidate (and baseline) vs the held-out split, and ``fid_floor`` at
    n_samples = min(N, 1500) (seed 0).
    """
    report = QualityReport(name=name, samples=len(candidate))
    if baseline is not None:
        stats = compare_samples(candidate, baseline, data_range)
        report.psnr_mean, report.psnr_min = stats["psnr_mean"], stats["psnr_min"]
        report.rel_l2_mean, report.rel_l2_max = stats["rel_l2_mean"], stats["rel_l2_max"]
        report.max_rel_error = stats["max_rel_error"]
    if labels is not None:
        report.class_accuracy = class_accuracy(candidate, labels, classifier)
        if baseline is not None:
            report.baseline_class_accuracy = class_accuracy(baseline, labels, classifier)
    if fid:
        report.digits_fid = digits_fid(candidate, classifier)
        if baseline is not None:
            report.baseline_digits_fid = digits_fid(baseline, classifier)
        report.fid_floor = fid_floor(n_samples=min(len(candidate), 1500), classifier=classifier)
    return report
