"""What ToDo and block-sparse attention cost in sample quality, on the shipped digits models.

    python -m bench.quality_attention --out bench/results [--samples 1000] [--models digits-dit,digits-unet]

For each model, ``samples`` digits (the same number per class, the same seeded noise as the
model card's baselines) are sampled with DPM-Solver++(2M), 20 steps, CFG 3: once with exact
attention (the baseline), then once per configuration of ``CONFIGS``. Each configuration reports
PSNR and relative L2 against the baseline per seed (:func:`diffrt.runtime.quality.compare_samples`),
class accuracy and digits-FID next to the baseline's, and the mean block-mask density the
attention calls saw. Writes ``<device>-<date>-attention-quality.json`` (stamped rows) and a
Markdown table beside it.

The digits models are small: the DiT attends over an 8 x 8 token grid (64 tokens), the UNet at
8 x 8 (level 1) and 4 x 4 (level 2), so the configurations force ToDo and sparsity onto those
grids (``min_tokens`` 0 or 64); on large models the defaults start at 4096 / 1024 tokens.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from bench import harness
from diffrt.runtime import models, optimize, quality
from diffrt.runtime import attention as runtime_attention
from diffrt.runtime.attention import Sparse, ToDo
from diffrt.runtime.models import baselines

log = logging.getLogger("bench.quality_attention")

SOLVER, STEPS, GUIDANCE = "dpmpp-2m", 20, 3.0
CONFIGS = {
    "digits-dit": {
        "todo f=2 nearest": {"todo": ToDo(2, min_tokens=0, mode="nearest")},
        "todo f=2 average": {"todo": ToDo(2, min_tokens=0, mode="average")},
        "window r=2 (16x16 blocks)": {"sparse": Sparse("window", radius=2, q_block=16, k_block=16, min_tokens=0)},
        "dynamic tau=0.9 (16x16 blocks)": {"sparse": Sparse("dynamic", tau=0.9, q_block=16, k_block=16, min_tokens=0)},
        "dynamic top 50% (16x16 blocks)": {"sparse": Sparse("dynamic", tau=None, topk=0.5, min_similarity=0.0,
                                                             q_block=16, k_block=16, min_tokens=0)},
    },
    "digits-unet": {
        "todo f=2 at 8x8 nearest": {"todo": ToDo({1: 2}, min_tokens=0, mode="nearest")},
        "todo f=2 at 8x8 average": {"todo": ToDo({1: 2}, min_tokens=0, mode="average")},
        "window r=2 at 8x8 (16x16 blocks)": {"sparse": Sparse("window", radius=2, q_block=16, k_block=16,
                                                               min_tokens=64)},
        "dynamic tau=0.9 at 8x8 (16x16 blocks)": {"sparse": Sparse("dynamic", tau=0.9, q_block=16, k_block=16,
                                                                    min_tokens=64)},
        "dynamic top 50% at 8x8 (16x16 blocks)": {"sparse": Sparse("dynamic", tau=None, topk=0.5, min_similarity=0.0,
                                                                    q_block=16, k_block=16, min_tokens=64)},
    },
}


class DensityMeter:
    """Mean block-mask density over the attention calls made while it is installed."""

    def __init__(self) -> None:
        self.total, self.calls = 0.0, 0
        self._real = runtime_attention.attention

    def __enter__(self) -> "DensityMeter":
        def metered(q, k, v, scale=None, kv_downsample=None, block_mask=None, backend="auto"):
            if block_mask is not None:
                self.total += block_mask.density
                self.calls += 1
            return self._real(q, k, v, scale=scale, kv_downsample=kv_downsample, block_mask=block_mask,
                              backend=backend)
        runtime_attention.attention = metered
        return self

    def __exit__(self, *exc) -> None:
        runtime_attention.attention = self._real

    @property
    def mean(self) -> float | None:
        return self.total / self.calls if self.calls else None


def evaluate(name: str, samples: int) -> list[dict]:
    den = models.load(name)
    labels = baselines.balanced_labels(samples)
    start = time.perf_counter()
    exact = baselines.sample_digits(den, labels, SOLVER, STEPS, GUIDANCE)
    base = {"accuracy": quality.class_accuracy(exact, labels), "fid": quality.digits_fid(exact),
            "seconds": time.perf_counter() - start}
    rows = [{"model": name, "configuration": "exact attention", "samples": samples, "psnr_mean": float("inf"),
             "psnr_min": float("inf"), "rel_l2_mean": 0.0, "class_accuracy": base["accuracy"],
             "digits_fid": base["fid"], "mask_density": None, "sampling_s": base["seconds"]}]
    for label, options in CONFIGS[name].items():
        fast = optimize(den, **options)
        start = time.perf_counter()
        with DensityMeter() as meter:
            images = baselines.sample_digits(fast, labels, SOLVER, STEPS, GUIDANCE)
        report = quality.quality_report(images, exact, labels=labels, fid=True, name=label)
        rows.append({"model": name, "configuration": label, "samples": samples, "psnr_mean": report.psnr_mean,
                     "psnr_min": report.psnr_min, "rel_l2_mean": report.rel_l2_mean,
                     "class_accuracy": report.class_accuracy, "digits_fid": report.digits_fid,
                     "mask_density": meter.mean, "sampling_s": time.perf_counter() - start})
        log.info("%s %s: %s", name, label, report.summary())
    for row in rows:
        row.update({"baseline_class_accuracy": base["accuracy"], "baseline_digits_fid": base["fid"],
                    "solver": SOLVER, "steps": STEPS, "guidance_scale": GUIDANCE, "noise_seed": baselines.NOISE_SEED})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | configuration | PSNR mean / min (dB) | rel. L2 | accuracy | digits-FID | mask density |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        density = "-" if r["mask_density"] is None else f"{r['mask_density']:.2f}"
        lines.append(f"| {r['model']} | {r['configuration']} | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} | "
                     f"{r['rel_l2_mean']:.3f} | {100 * r['class_accuracy']:.1f}% | {r['digits_fid']:.2f} | {density} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=quality.FID_MIN_SAMPLES)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for name in args.models.split(","):
            rows.extend(evaluate(name, args.samples))
    table = markdown(rows)
    print(table)
    path = harness.write_results(args.out, "attention-quality", rows, harness.environment_stamp("cpu"),
                                 extra={"setting": f"{SOLVER} {STEPS} steps, CFG {GUIDANCE:g}, {args.samples} samples",
                                        "floor": baselines.fid_floor_of_card()})
    Path(path).with_suffix(".md").write_text(table + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
