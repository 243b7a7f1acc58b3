"""Measured baselines of the shipped denoisers: class accuracy and digits-FID per sampler setting.

    python -m diffrt.runtime.models.baselines --model digits-dit|digits-unet [--samples 1000] [--weights DIR]

For each solver setting in ``SETTINGS`` (DDIM 50 steps, DPM-Solver++(2M) 20 and 10 steps, UniPC
10 steps) and each guidance scale in ``GUIDANCE`` (1: no classifier-free guidance, the
conditional branch alone; 3: CFG with the null class), plus ``EXTRA`` (DDIM 50 with diffusers'
default ``clip_sample=True``, at CFG 3), ``samples`` digits (the same number of each class; the
same seeded noise for every setting) are sampled and judged by the shipped digits classifier:

* ``class_accuracy``: the fraction classified as the class asked for;
* ``digits_fid``: :func:`diffrt.runtime.quality.digits_fid` against the held-out split, next to
  the real-vs-real floor of the classifier's card (``ratio_to_floor`` = fid / floor);
* ``pixels_beyond_1.05``: the fraction of pixels outside [-1.05, 1.05] before clamping.

The results go into the model card under ``"baselines"`` with the goals of the reference-models
issue (accuracy >= 95% with CFG 3 at 20 steps; digits-FID within 3x the floor) marked met or not.
The accelerations later compare against these numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import models, quality
from ..denoiser import Denoiser
from ..sampler import Sampler

log = logging.getLogger(__name__)

# (solver, steps, options). DDIM runs without clipping x0, like the other solvers: diffusers'
# DDIMScheduler clips by default, which at CFG 3 ruins these pixel models' samples (EXTRA shows it).
SETTINGS = (("ddim", 50, {"clip_sample": False}), ("dpmpp-2m", 20, {}), ("dpmpp-2m", 10, {}), ("unipc", 10, {}))
GUIDANCE = (1.0, 3.0)
EXTRA = (("ddim", 50, {}, 3.0),)  # (solver, steps, options, guidance scale)
NOISE_SEED = 1
ACCURACY_GOAL = 0.95  # with CFG 3 at 20 steps
FID_GOAL_RATIO = 3.0  # digits-FID within this factor of the real-vs-real floor


def balanced_labels(samples: int) -> torch.Tensor:
    """Class labels 0..9, ``samples // 10`` of each, int64 [samples]; samples must be a positive multiple of 10."""
    if samples <= 0 or samples % 10:
        raise ValueError(f"samples must be a positive multiple of 10 (the same count per class), got {samples}")
    return torch.arange(10).repeat_interleave(samples // 10)


@torch.no_grad()
def sample_digits(den: Denoiser, labels: torch.Tensor, solver: str, steps: int, guidance_scale: float | None,
                  seed: int = NOISE_SEED, batch_size: int = 500, stats: dict | None = None, **options) -> torch.Tensor:
    """Samples [N, 1, 16, 16] of ``labels`` [N] from unit noise seeded by ``seed`` (float32, CPU, not clamped).

    ``guidance_scale`` None or 1 runs the conditional branch alone; otherwise CFG with the null class.
    The noise depends on the seed and N only, so settings compare on the same noise. ``options``
    go to the Sampler (``clip_sample=False``, ``adaptive_guidance=0.99``, ...); ``stats``, a dict,
    receives the sums of the sampler's numeric stats over the batches (model evaluations saved).
    """
    noise = torch.randn(len(labels), *den.sample_shape, generator=torch.Generator().manual_seed(seed))
    guided = guidance_scale is not None and guidance_scale != 1.0
    sampler = Sampler(den, solver, steps, guidance_scale=guidance_scale if guided else None, **options)
    device = den.device or torch.device("cpu")
    chunks = []
    for n, y in zip(noise.split(batch_size), labels.split(batch_size)):
        y = y.to(device)
        uncond = torch.full_like(y, models.NULL_CLASS) if guided else None
        chunks.append(sampler.sample(n.to(device, den.dtype or torch.float32), cond=y, uncond=uncond).float().cpu())
        if stats is not None:
            for key, value in sampler.stats.items():
                for name, number in (value.items() if isinstance(value, dict) else [(None, value)]):
                    if isinstance(number, (int, float)) and not isinstance(number, bool):
                        full_key = key if name is None else f"{key}.{name}"
                        stats[full_key] = stats.get(full_key, 0) + number
    return torch.cat(chunks)


def grid(settings=SETTINGS, guidance=GUIDANCE, extra=EXTRA) -> list[tuple[str, int, dict, float, bool]]:
    """The measured (solver, steps, options, guidance scale, is_extra) combinations."""
    main = [(solver, steps, options, scale, False) for solver, steps, options in settings for scale in guidance]
    return main + [(*setting, True) for setting in extra]


def measure(den: Denoiser, samples: int = quality.FID_MIN_SAMPLES, settings=None,
            progress: bool = True) -> list[dict[str, Any]]:
    """One row per entry of ``settings`` (default :func:`grid`): accuracy, digits-FID and the sampling time."""
    labels = balanced_labels(samples)
    floor = fid_floor_of_card()
    rows = []
    for solver, steps, options, scale, extra in tqdm(settings or grid(), desc="baselines", unit="setting",
                                                     disable=not progress):
        start = time.perf_counter()
        images = sample_digits(den, labels, solver, steps, scale, **options)
        seconds = time.perf_counter() - start
        fid = quality.digits_fid(images)
        row = {"solver": solver, "steps": steps, "options": options, "guidance_scale": scale, "extra": extra,
               "class_accuracy": round(quality.class_accuracy(images, labels), 4),
               "digits_fid": round(fid, 4), "ratio_to_floor": round(fid / floor, 3) if floor else None,
               "pixels_beyond_1.05": round((images.abs() > 1.05).double().mean().item(), 5),
               "sampling_s": round(seconds, 1)}
        log.info("baseline %s", json.dumps(row))
        rows.append(row)
    return rows


def fid_floor_of_card() -> float | None:
    """The real-vs-real digits-FID floor recorded in the classifier's model card (None if absent)."""
    from .digits import classifier_card  # noqa: PLC0415

    return classifier_card().get("metrics", {}).get("fid_floor", {}).get("value")


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals on the main grid: accuracy with CFG 3 at 20 steps; which FIDs are within 3x the floor."""
    at_20 = [r for r in rows if (r["solver"], r["steps"], r["guidance_scale"]) == ("dpmpp-2m", 20, 3.0)]
    rows = [r for r in rows if not r["extra"]]
    ratios = [r["ratio_to_floor"] for r in rows if r["ratio_to_floor"] is not None]
    best = min(ratios) if ratios else None
    return {
        "accuracy_cfg3_20_steps": {"goal": ACCURACY_GOAL, "measured": at_20[0]["class_accuracy"] if at_20 else None,
                                   "met": bool(at_20) and at_20[0]["class_accuracy"] >= ACCURACY_GOAL},
        "fid_within_3x_floor": {"goal_ratio": FID_GOAL_RATIO, "best_ratio": best,
                                "met_by": [f"{r['solver']}-{r['steps']}-cfg{r['guidance_scale']:g}" for r in rows
                                           if r["ratio_to_floor"] is not None and r["ratio_to_floor"] <= FID_GOAL_RATIO]},
    }


def update_card(name: str, samples: int = quality.FID_MIN_SAMPLES, weights_dir: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Measure ``name``'s baselines and write them into its model card; return the "baselines" entry."""
    path = Path(weights_dir or models.WEIGHTS_DIR) / f"{name}.json"
    den = models.load(name, weights_dir=weights_dir)
    rows = measure(den, samples, progress=progress)
    entry = {"samples": samples, "per_class": samples // 10, "noise_seed": NOISE_SEED,
             "reference": "heldout split (297 images)", "fid_floor": fid_floor_of_card(),
             "classifier": "digits-classifier", "torch": torch.__version__, "threads": torch.get_num_threads(),
             "date": datetime.date.today().isoformat(), "rows": rows, "goals": goals(rows)}
    card = json.loads(path.read_text())
    card.pop("quick_eval", None)
    card["baselines"] = entry
    path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote the baselines of %s into %s", name, path)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.runtime.models.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--samples", type=int, default=quality.FID_MIN_SAMPLES, help="samples per setting")
    parser.add_argument("--weights", type=Path, default=None, help="folder with the weights and card")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    entry = update_card(args.model, args.samples, args.weights)
    print(json.dumps(entry["goals"], indent=2))
    return 0


if __name__ == "__main__":
    from diffrt.runtime.models.baselines import main as package_main  # one module object, not __main__ + package

    raise SystemExit(package_main())
