"""The shipped reference models: small class-conditional denoisers of 16x16 handwritten digits.

``load(name)`` returns a :class:`~diffrt.runtime.Denoiser` for each name in :func:`available`:

* ``"digits-dit"``: :class:`~diffrt.runtime.models.dit.DigitsDiT`, a DiT with adaLN-Zero blocks
  whose block stack can be exited after any block (``model(x, t, y, depth=k)``).
* ``"digits-unet"``: a diffusers ``UNet2DModel`` with a class embedding.

Both were trained under a DDPM linear-beta schedule (1e-4..0.02, 1000 steps); what they
predict (``den.prediction_type``) is in the model card's scheduler config. Sample shape
(1, 16, 16), pixels in [-1, 1]. ``cond`` is the class labels, int64 [B] in 0..9;
label ``NULL_CLASS`` (10) is the learned unconditional class for classifier-free guidance::

    from diffrt.runtime import Sampler, models
    den = models.load("digits-dit")
    labels = torch.arange(10)
    x = Sampler(den, "dpmpp-2m", 20, guidance_scale=3.0).sample(
        torch.randn(10, *den.sample_shape), cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))

Weights (safetensors, stored in float16) and a model card (JSON: architecture, data, schedule,
training, measured baselines) live in ``weights/``; ``python -m diffrt.runtime.models.train``
made them. :func:`card` returns a model card.

``load_digits`` and ``load_classifier`` (the data and the digits classifier the quality metrics
use) are re-exported from :mod:`diffrt.runtime.models.digits`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule

log = logging.getLogger(__name__)

NULL_CLASS = 10
"""The unconditional class label (the 11th row of the class embeddings): ``uncond=torch.full_like(labels, NULL_CLASS)``."""

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("digits-dit", "digits-unet")

__all__ = ["NULL_CLASS", "WEIGHTS_DIR", "available", "build_model", "card", "load", "load_classifier", "load_digits",
           "load_model"]


def available() -> list[str]:
    """The names ``load`` accepts."""
    return list(MODEL_NAMES)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown reference model {name!r}; available: {', '.join(MODEL_NAMES)}")


def card(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The model card (parsed JSON) of a reference model."""
    _check_name(name)
    path = Path(weights_dir or WEIGHTS_DIR) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"the model card of {name!r} is missing ({path}); train it with "
                                f"`python -m diffrt.runtime.models.train --model {name}`")
    return json.loads(path.read_text())


def build_model(architecture: dict[str, Any]) -> torch.nn.Module:
    """An untrained model from a card's ``architecture`` entry ({"class": ..., "config": {...}})."""
    cls_name, config = architecture["class"], architecture["config"]
    if cls_name == "DigitsDiT":
        from .dit import DigitsDiT  # noqa: PLC0415 - keep `import diffrt.runtime.models` light
        return DigitsDiT.from_config(config)
    if cls_name == "UNet2DModel":
        try:
            from diffusers import UNet2DModel  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise ImportError("digits-unet is a diffusers UNet2DModel: `pip install diffusers`") from exc
        return UNet2DModel.from_config(config)
    raise ValueError(f"unknown architecture class {cls_name!r} (DigitsDiT, UNet2DModel)")


def _call_dit(model, x, t, cond):
    """DigitsDiT convention: model(x, t, y) with y = class labels [B] (None: the null class)."""
    return model(x, t, cond)


def load(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         weights_dir: str | Path | None = None) -> Denoiser:
    """The shipped reference model ``name`` as a :class:`Denoiser` (eval mode, no grad).

    Args:
        name: one of :func:`available`.
        device: where to put the model (default CPU).
        dtype: the model's compute dtype (default float32; the weights are stored in float16).
        weights_dir: a folder with ``<name>.safetensors`` and ``<name>.json`` (default: the shipped ones).
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    info = card(name, weights_dir)
    path = Path(weights_dir or WEIGHTS_DIR) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"the weights of {name!r} are missing ({path}); train them with "
                                f"`python -m diffrt.runtime.models.train --model {name}`")
    model = build_model(info["architecture"])
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the architecture in its card: missing {missing}, unexpected {unexpected}")
    model = model.to(device or "cpu").eval().requires_grad_(False)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    if info["architecture"]["class"] == "UNet2DModel":
        return Denoiser.from_diffusers(model, info["scheduler"])
    from .exits import load_exit_heads  # noqa: PLC0415

    model.attach_exit_heads(load_exit_heads(model, weights_dir or WEIGHTS_DIR))
    den = Denoiser(model, NoiseSchedule.from_config(info["scheduler"]), sample_shape=tuple(info["sample_shape"]),
                   call=_call_dit)
    den.condition_classes = model.null_class + 1  # 0-9 and the null class
    return den


def load_model(spec: str | Path, scheduler_config: str | Path | None = None) -> Denoiser:
    """A reference model by name (:func:`load`), or a diffusers model folder as a :class:`Denoiser`.

    A folder holds the model's ``config.json`` (naming its diffusers class) and weights; its scheduler
    config is ``scheduler_config`` when given, else ``<folder>/scheduler_config.json`` or a pipeline's
    ``<folder>/../scheduler/scheduler_config.json``.
    """
    if str(spec) in MODEL_NAMES:
        return load(str(spec))
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {str(spec)!r} is neither a reference model ({', '.join(MODEL_NAMES)}) nor a "
                         "diffusers model folder with a config.json")
    import diffusers  # noqa: PLC0415

    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    model = getattr(diffusers, class_name).from_pretrained(folder).eval()
    candidates = [Path(scheduler_config)] if scheduler_config else [folder / "scheduler_config.json",
                                                                    folder.parent / "scheduler" / "scheduler_config.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ValueError(f"no scheduler config for {folder} (looked at {', '.join(map(str, candidates))}): "
                         "give --scheduler-config")
    return Denoiser.from_diffusers(model, json.loads(found.read_text()))


def __getattr__(attr: str) -> Any:
    """``load_digits`` / ``load_classifier`` come from .digits, imported on first use."""
    if attr in ("load_digits", "load_classifier"):
        from . import digits  # noqa: PLC0415 - lazy: it needs scikit-learn for the data
        return getattr(digits, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
