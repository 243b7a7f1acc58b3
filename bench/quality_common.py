"""Shared by the quality scripts: sample a digits model exactly and with variants on the same noise,
and report each variant's change (PSNR / relative L2 per seed, class accuracy, digits-FID).

The setting is the model cards' main one: DPM-Solver++(2M), 20 steps, CFG 3, the cards' noise
seed, the same number of samples per class.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from diffrt.runtime import models, quality
from diffrt.runtime.models import baselines

from . import harness

log = logging.getLogger("bench.quality")

SOLVER, STEPS, GUIDANCE = "dpmpp-2m", 20, 3.0

# label -> (make the variant from the exact denoiser, a context manager around its sampling that
# returns extra numbers for the row, or None[, Sampler options such as adaptive_guidance])
Variant = tuple


def compare_variants(name: str, samples: int, variants: dict[str, Variant]) -> list[dict[str, Any]]:
    """Rows: the exact model first, then each variant, on the same labels and noise."""
    den = models.load(name)
    labels = baselines.balanced_labels(samples)
    start = time.perf_counter()
    exact = baselines.sample_digits(den, labels, SOLVER, STEPS, GUIDANCE)
    base = {"accuracy": quality.class_accuracy(exact, labels), "fid": quality.digits_fid(exact)}
    rows = [{"model": name, "configuration": "exact (fp32)", "samples": samples, "psnr_mean": float("inf"),
             "psnr_min": float("inf"), "rel_l2_mean": 0.0, "class_accuracy": base["accuracy"],
             "digits_fid": base["fid"], "sampling_s": time.perf_counter() - start}]
    for label, (make, meter, *sampler_options) in variants.items():
        prepared = time.perf_counter()
        candidate = make(den)
        prepare_s = time.perf_counter() - prepared
        start = time.perf_counter()
        sampler_stats: dict[str, Any] = {}
        with (meter() if meter else contextlib.nullcontext()) as measured:
            images = baselines.sample_digits(candidate, labels, SOLVER, STEPS, GUIDANCE, stats=sampler_stats,
                                             **(sampler_options[0] if sampler_options else {}))
        report = quality.quality_report(images, exact, labels=labels, fid=True, name=label)
        rows.append({"model": name, "configuration": label, "samples": samples, "psnr_mean": report.psnr_mean,
                     "psnr_min": report.psnr_min, "rel_l2_mean": report.rel_l2_mean,
                     "class_accuracy": report.class_accuracy, "digits_fid": report.digits_fid,
                     "prepare_s": prepare_s, "sampling_s": time.perf_counter() - start,
                     **(measured.numbers() if hasattr(measured, "numbers") else {}), **_evaluations(sampler_stats),
                     **_cache_numbers(candidate)})
        log.info("%s %s: %s", name, label, report.summary())
    for row in rows:
        row.update({"baseline_class_accuracy": base["accuracy"], "baseline_digits_fid": base["fid"],
                    "accuracy_drop_points": 100 * (base["accuracy"] - row["class_accuracy"]),
                    "fid_change": row["digits_fid"] / base["fid"] - 1, "solver": SOLVER, "steps": STEPS,
                    "guidance_scale": GUIDANCE, "noise_seed": baselines.NOISE_SEED})
    return rows


def _evaluations(stats: dict[str, Any]) -> dict[str, Any]:
    """Model evaluations saved (adaptive guidance) and blocks saved (early exit), when the sampler counted them."""
    out: dict[str, Any] = {}
    if "evaluations" in stats:
        out.update(evaluations=stats["evaluations"], evaluations_saved=1 - stats["evaluations"] / stats["cfg_evaluations"])
    if stats.get("early_exit.blocks_full"):
        out["blocks_saved"] = 1 - stats["early_exit.blocks_run"] / stats["early_exit.blocks_full"]
    return out


def _cache_numbers(candidate) -> dict[str, Any]:
    """The share of transformer blocks a step cache skipped (the first block always runs)."""
    cache = getattr(candidate, "step_cache", None)
    if cache is None:
        return {}
    blocks = len(candidate.model.blocks) if hasattr(candidate.model, "blocks") else None
    skipped = cache.stats["skipped_fraction"]
    return {"calls_skipped": skipped, "blocks_saved": None if blocks is None else skipped * (blocks - 1) / blocks}


def markdown(rows: list[dict], extra: tuple[tuple[str, str], ...] = ()) -> str:
    """A Markdown table of the rows (``extra``: (header, row key) columns appended)."""
    headers = ["model", "configuration", "PSNR mean / min (dB)", "rel. L2", "accuracy", "digits-FID (change)"]
    lines = ["| " + " | ".join(headers + [h for h, _ in extra]) + " |", "|" + " --- |" * (len(headers) + len(extra))]
    for r in rows:
        cells = [r["model"], r["configuration"], f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f}", f"{r['rel_l2_mean']:.3f}",
                 f"{100 * r['class_accuracy']:.1f}%", f"{r['digits_fid']:.2f} ({100 * r['fid_change']:+.1f}%)"]
        cells += ["-" if r.get(key) is None else f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key])
                  for _, key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: str | Path, topic: str, rows: list[dict], table: str, samples: int) -> Path:
    """The stamped JSON and the Markdown table beside it; returns the JSON path."""
    path = harness.write_results(out, topic, rows, harness.environment_stamp("cpu"),
                                 extra={"setting": f"{SOLVER} {STEPS} steps, CFG {GUIDANCE:g}, {samples} samples",
                                        "floor": baselines.fid_floor_of_card()})
    Path(path).with_suffix(".md").write_text(table + "\n")
    return path


def parser(prog: str, description: str, models_default: str):
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=quality.FID_MIN_SAMPLES)
    p.add_argument("--models", default=models_default)
    p.add_argument("--threads", type=int, default=None)
    return p


def setup(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
