"""The digits data and the digits classifier that the quality metrics use.

Data: the 1797 handwritten digits that scikit-learn ships (8x8, values 0..16, 10 classes),
upsampled to ``RESOLUTION`` = 16 and mapped to [-1, 1]::

    x = bilinear_upsample(v / 16, 8x8 -> 16x16, align_corners=False) * 2 - 1      float32 [N, 1, 16, 16]

(bilinear interpolation of values in [0, 1] stays in [0, 1], so x is in [-1, 1]). One split,
made once with a fixed seed, is used everywhere: ``HELDOUT_COUNT`` = 297 held-out images, the
other 1500 for training, stratified by class (see :func:`split_indices`).

Classifier: :class:`DigitsClassifier`, a small CNN trained on the train split by
:func:`train_classifier` (seeded, CPU). Its penultimate features (``features(x)``) are the space
in which :mod:`diffrt.runtime.quality` measures the digits-FID. The shipped weights and model
card are in ``weights/digits-classifier.{safetensors,json}``; remake them with
``python -m diffrt.runtime.models.train --model digits-classifier``.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

RESOLUTION = 16
NUM_CLASSES = 10
HELDOUT_COUNT = 297
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_NAME = "digits-classifier"
DEFAULT_CONFIG: dict[str, Any] = {"channels": [32, 64], "feature_dim": 64, "num_classes": NUM_CLASSES,
                                  "dropout": 0.2}
TRAIN_RECIPE: dict[str, Any] = {"steps": 2000, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "warmup": 100,
                                "label_smoothing": 0.05, "max_rotation_deg": 10.0, "max_scale": 0.1,
                                "max_shift_px": 1.5}


# ----------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: (images float32 [1797, 1, 16, 16] in [-1, 1], labels int64 [1797]); cached."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError("the digits data comes from scikit-learn: install the `test` extra "
                          "(`pip install -e .[test]`) or `pip install scikit-learn`") from exc
    bunch = sklearn_load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(pixels, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False) * 2 - 1
    return images.contiguous(), torch.tensor(bunch.target, dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices [1500], held-out indices [297]) into the 1797 digits, each sorted ascending.

    Stratified with a fixed seed (``SPLIT_SEED`` = 0, numpy's ``RandomState``, whose stream numpy
    keeps stable across versions): the held-out count of class c is n_c * 297 / 1797 rounded by the
    largest remainder (so the counts sum to 297); within each class the held-out images are the
    first ones of a seeded permutation.
    """
    _, labels = _all_digits()
    labels_np = labels.numpy()
    counts = np.bincount(labels_np, minlength=NUM_CLASSES)
    exact = counts * HELDOUT_COUNT / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[: HELDOUT_COUNT - quota.sum()]] += 1
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels_np))
    heldout = np.concatenate([order[labels_np[order] == c][: quota[c]] for c in range(NUM_CLASSES)])
    is_heldout = np.zeros(len(labels_np), dtype=bool)
    is_heldout[heldout] = True
    return torch.from_numpy(np.flatnonzero(~is_heldout)), torch.from_numpy(np.flatnonzero(is_heldout))


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of one split: (images float32 [N, 1, 16, 16] in [-1, 1], labels int64 [N]).

    ``split``: "train" (1500), "heldout" (297) or "all" (1797), in scikit-learn's order. Images are
    sklearn's 8x8 values / 16, bilinearly upsampled to 16x16 with ``align_corners=False``, * 2 - 1.
    The data are cached; each call returns fresh copies. Needs scikit-learn (the `test` extra).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    images, labels = _all_digits()
    if split == "all":
        return images.clone(), labels.clone()
    index = split_indices()[0 if split == "train" else 1]
    return images[index].clone(), labels[index].clone()


# ----------------------------------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits: input float [N, 1, 16, 16] in [-1, 1] -> logits [N, 10].

    Layout (config ``channels`` = [c1, c2], ``feature_dim`` = F)::

        conv3x3(1 -> c1) ReLU conv3x3(c1 -> c1) ReLU maxpool2      -> [N, c1, 8, 8]
        conv3x3(c1 -> c2) ReLU conv3x3(c2 -> c2) ReLU maxpool2     -> [N, c2, 4, 4]
        flatten -> Linear(16 c2 -> F) ReLU                          -> features [N, F]
        dropout -> Linear(F -> 10)                                  -> logits [N, 10]
    """

    def __init__(self, channels: list[int] | tuple[int, int] = (32, 64), feature_dim: int = 64,
                 num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "feature_dim": feature_dim, "num_classes": num_classes,
                       "dropout": dropout}
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (RESOLUTION // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DigitsClassifier:
        return cls(**config)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the hidden layer's ReLU): [N, 1, 16, 16] -> [N, F]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, RESOLUTION, RESOLUTION):
            raise ValueError(f"DigitsClassifier expects images [N, 1, {RESOLUTION}, {RESOLUTION}], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.features(x))


def augment(images: torch.Tensor, generator: torch.Generator, recipe: dict[str, Any]) -> torch.Tensor:
    """Random small affine warps (rotation, isotropic scale, shift; background stays -1).

    Per image: angle ~ U(-r, r) degrees, scale ~ U(1 - s, 1 + s), shift ~ U(-d, d) pixels per axis;
    bilinear resampling of x + 1 with zero padding, then - 1 (so the padding is background -1).
    """
    n = len(images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(recipe["max_rotation_deg"])
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * recipe["max_scale"]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * recipe["max_shift_px"] * 2 / RESOLUTION
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def evaluate(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (put in eval mode) on (images, labels)."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in images.split(512)])
    return {"accuracy": (logits.argmax(1) == labels).double().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def _learning_rate(step: int, steps: int, recipe: dict[str, Any]) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < recipe["warmup"]:
        return recipe["lr"] * (step + 1) / recipe["warmup"]
    progress = (step - recipe["warmup"]) / max(1, steps - recipe["warmup"])
    return recipe["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def train_classifier(seed: int = 0, steps: int = TRAIN_RECIPE["steps"],
                     progress: bool = True) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train a :class:`DigitsClassifier` on the train split (CPU, deterministic for a seed and thread count).

    AdamW, batches of 64 drawn from seeded epoch permutations, augmented by :func:`augment`,
    label-smoothed cross-entropy, warm-up + cosine learning rate. Returns the model (eval mode)
    and its model card (a dict; :func:`save_classifier` writes both).
    """
    recipe = dict(TRAIN_RECIPE, steps=steps)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits("train")
    model = DigitsClassifier.from_config(DEFAULT_CONFIG)
    params = sum(p.numel() for p in model.parameters())
    log.info("digits-classifier: %d parameters, %d training images, %d steps, seed %d", params, len(images), steps, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    order, cursor, batch = torch.randperm(len(images), generator=generator), 0, recipe["batch_size"]
    loss_ema, start = None, time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc=CLASSIFIER_NAME, unit="step", disable=not progress, dynamic_ncols=True,
                     mininterval=1.0 if sys.stderr.isatty() else 10.0):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index, cursor = order[cursor:cursor + batch], cursor + batch
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, recipe)
        logits = model(augment(images[index], generator, recipe))
        loss = F.cross_entropy(logits, labels[index], label_smoothing=recipe["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log.info("step %d/%d: loss (EMA 0.98) %.4f", step + 1, steps, loss_ema)
    wall = time.perf_counter() - start
    model.eval()
    card = _model_card(model, recipe, seed, params, loss_ema, wall)
    log.info("digits-classifier: held-out accuracy %.4f, train accuracy %.4f, %.1f s",
             card["metrics"]["heldout_accuracy"], card["metrics"]["train_accuracy"], wall)
    return model, card


def _model_card(model: DigitsClassifier, recipe: dict[str, Any], seed: int, params: int,
                final_loss: float | None, wall: float) -> dict[str, Any]:
    heldout = evaluate(model, *load_digits("heldout"))
    train = evaluate(model, *load_digits("train"))
    train_count, heldout_count = (len(index) for index in split_indices())
    return {
        "name": CLASSIFIER_NAME,
        "architecture": {"class": "DigitsClassifier", "config": dict(model.config),
                         "layers": "conv3x3-ReLU x2, maxpool, conv3x3-ReLU x2, maxpool, Linear-ReLU (features), "
                                   "dropout, Linear (logits)"},
        "parameters": params,
        "input": {"shape": [1, RESOLUTION, RESOLUTION], "range": [-1.0, 1.0]},
        "features": {"dim": model.feature_dim, "layer": "hidden Linear after ReLU (penultimate)"},
        "data": {"source": "sklearn.datasets.load_digits (8x8, values 0..16)", "resolution": [RESOLUTION, RESOLUTION],
                 "channels": 1, "preprocessing": "v / 16, bilinear upsample 8->16 (align_corners=False), * 2 - 1",
                 "split": {"train": train_count, "heldout": heldout_count, "seed": SPLIT_SEED,
                           "method": "stratified by class, numpy RandomState permutation"},
                 "trained_on": "train", "loader": "diffrt.runtime.models.digits.load_digits"},
        "training": {**recipe, "optimizer": "AdamW", "lr_schedule": "linear warm-up, cosine to 0",
                     "augmentation": "random rotation, scale, shift (digits.augment)",
                     "final_loss": None if final_loss is None else round(final_loss, 6),
                     "final_loss_note": "EMA (0.98) of the label-smoothed training cross-entropy",
                     "seed": seed, "device": "cpu", "threads": torch.get_num_threads(),
                     "wall_time_s": round(wall, 1), "torch": torch.__version__,
                     "python": platform.python_version(), "date": datetime.date.today().isoformat()},
        "metrics": {"heldout_accuracy": round(heldout["accuracy"], 6), "heldout_loss": round(heldout["loss"], 6),
                    "heldout_count": heldout_count, "train_accuracy": round(train["accuracy"], 6)},
    }


def save_classifier(model: DigitsClassifier, card: dict[str, Any],
                    weights_dir: str | Path | None = None) -> Path:
    """Write ``digits-classifier.safetensors`` (float32) and ``digits-classifier.json``; return the weights path."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(weights_dir or WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{CLASSIFIER_NAME}.safetensors"
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "model": CLASSIFIER_NAME, "dtype": "float32"})
    card = {**card, "weights": {"file": path.name, "dtype": "float32", "bytes": path.stat().st_size}}
    (out / f"{CLASSIFIER_NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s and its model card", path)
    return path


def classifier_card(weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The classifier's model card (parsed JSON)."""
    path = Path(weights_dir or WEIGHTS_DIR) / f"{CLASSIFIER_NAME}.json"
    if not path.is_file():
        raise FileNotFoundError(f"the digits-classifier model card is missing ({path}); train it with "
                                "`python -m diffrt.runtime.models.train --model digits-classifier`")
    return json.loads(path.read_text())


def load_classifier(device: str | torch.device | None = None,
                    weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (``weights/digits-classifier.safetensors``), eval mode, no grad."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(weights_dir or WEIGHTS_DIR) / f"{CLASSIFIER_NAME}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"the digits-classifier weights are missing ({path}); train them with "
                                "`python -m diffrt.runtime.models.train --model digits-classifier`")
    model = DigitsClassifier.from_config(classifier_card(weights_dir)["architecture"]["config"])
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match its model card: missing {missing}, unexpected {unexpected}")
    return model.to(device or "cpu").eval().requires_grad_(False)
