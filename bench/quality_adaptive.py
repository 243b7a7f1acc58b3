"""Adaptive computation's quality / savings curves on the digits models: threshold sweeps.

    python -m diffrt.bench.quality_adaptive --out bench/results [--samples 1000] [--models digits-dit,digits-unet]
        [--only "adaptive guidance 0.95,early exit 0.2"]   (configurations whose names start so; default all)

Adaptive guidance: for each threshold of ``THRESHOLDS`` (cosine similarity between the conditional
and unconditional predictions at which a sample drops its unconditional pass); LinearAG (coefficients
fitted on ``LINEAR_AG_SAMPLES`` trajectories of other noise) over the first half and over the whole
trajectory, alone and with adaptive guidance. The DiT only: step caching (first-block cache) for
each of ``CACHE_THRESHOLDS``, and layer early exit with its shipped exit heads for each of
``EXIT_THRESHOLDS`` (rows exit one by one) and at ``BATCH_EXIT_THRESHOLD`` for the whole batch, each
planned on the host from the previous model calls (the default: no host sync) and, at the default
threshold, with the synchronous decision (``early_exit_sync=True``) beside it.
Against the model cards' setting (DPM-Solver++(2M), 20 steps, CFG 3, the same noise): model
evaluations or blocks saved, PSNR, class accuracy, digits-FID. Writes ``<device>-<date>-adaptive-guidance.json``, the Markdown table
and a PNG of savings vs accuracy drop and FID change beside it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffrt.runtime import Sampler, models, optimize
from diffrt.runtime.linear_ag import fit_linear_ag

from . import quality_common

THRESHOLDS = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9)
CACHE_THRESHOLDS = (0.05, 0.1, 0.15, 0.2)
EXIT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4)  # per sample; and the whole batch at one threshold beside it
BATCH_EXIT_THRESHOLD = 0.2
LINEAR_AG_SAMPLES, LINEAR_AG_SEED = 256, 4321  # the fit's trajectories (the evaluation uses the cards' seed)


SERIES = (("adaptive guidance", "evaluations_saved"), ("linear ag", "evaluations_saved"),
          ("step cache", "blocks_saved"), ("early exit (whole batch)", "blocks_saved"), ("early exit", "blocks_saved"))


def _series(configuration: str) -> tuple[str, str] | None:
    """The (series, savings key) a row belongs to: the longest matching prefix of ``SERIES``."""
    matches = [s for s in SERIES if configuration.startswith(s[0])]
    return max(matches, key=lambda s: len(s[0])) if matches else None


def plot(rows: list[dict], path: Path) -> Path | None:
    """Savings vs accuracy drop, digits-FID change and PSNR against exact CFG, one line per model and
    technique (None without matplotlib)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("accuracy drop (points)", lambda r: r["accuracy_drop_points"]),
              ("digits-FID change (%)", lambda r: 100 * r["fid_change"]),
              ("PSNR vs exact CFG (dB, identical = 80)", lambda r: min(r["psnr_mean"], 80.0)))
    for model in sorted({r["model"] for r in rows}):
        for name, saving in SERIES:
            points = sorted((r[saving], *(value(r) for _, value in panels)) for r in rows
                            if r["model"] == model and _series(r["configuration"]) == (name, saving)
                            and r.get(saving) is not None)
            for k, axis in enumerate(axes):
                if points:
                    axis.plot([p[0] for p in points], [p[k + 1] for p in points], "o-", label=f"{model}, {name}")
    for axis, (label, _) in zip(axes, panels):
        axis.set(xlabel="model evaluations (or blocks) saved", ylabel=label)
        axis.grid(True)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def linear_ag_variants(name: str) -> dict:
    """LinearAG every other step over the first half / the whole trajectory, and the first with AG."""
    den = models.load(name)
    sampler = Sampler(den, quality_common.SOLVER, quality_common.STEPS, guidance_scale=quality_common.GUIDANCE)
    null = torch.full((1,), models.NULL_CLASS)
    variants = {}
    for until in (0.5, 1.0):
        lag = fit_linear_ag(sampler, torch.arange(10), null, samples=LINEAR_AG_SAMPLES, seed=LINEAR_AG_SEED,
                            until=until)
        variants[f"linear ag every 2 until {until:g}"] = (lambda den: den, None, {"linear_ag": lag})
        if until == 0.5:
            variants["linear ag until 0.5 + adaptive guidance 0.99"] = (
                lambda den: den, None, {"linear_ag": lag, "adaptive_guidance": 0.99})
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = quality_common.parser("python -m diffrt.bench.quality_adaptive", __doc__.split("\n")[0],
                                   "digits-dit,digits-unet")
    parser.add_argument("--only", default=None, help="comma-separated prefixes of the configurations to run")
    args = parser.parse_args(argv)
    quality_common.setup(args)
    rows = []
    with torch.no_grad():
        for name in args.models.split(","):
            variants = {f"adaptive guidance {t:g}": (lambda den: den, None, {"adaptive_guidance": t})
                        for t in THRESHOLDS}
            if not args.only or "linear ag" in args.only:  # fitting it samples 256 trajectories
                variants.update(linear_ag_variants(name))
            if name == "digits-dit":
                variants.update({f"step cache {t:g}": (lambda den, t=t: optimize(den, step_cache=t), None)
                                 for t in CACHE_THRESHOLDS})
                if getattr(models.load(name).model, "exit_heads", None) is not None:
                    variants.update({f"early exit {t:g}": (lambda den: den, None, {"early_exit": t})
                                     for t in EXIT_THRESHOLDS})
                    variants[f"early exit (whole batch) {BATCH_EXIT_THRESHOLD:g}"] = (
                        lambda den: den, None, {"early_exit": BATCH_EXIT_THRESHOLD, "early_exit_scope": "batch"})
                    for scope in ("sample", "batch"):
                        label = "early exit" if scope == "sample" else "early exit (whole batch)"
                        variants[f"{label} {BATCH_EXIT_THRESHOLD:g} synchronous"] = (
                            lambda den: den, None, {"early_exit": BATCH_EXIT_THRESHOLD, "early_exit_scope": scope,
                                                    "early_exit_sync": True})
            if args.only:
                wanted = [w.strip() for w in args.only.split(",")]
                variants = {k: v for k, v in variants.items() if any(k.startswith(w) for w in wanted)}
            rows.extend(quality_common.compare_variants(name, args.samples, variants))
    table = quality_common.markdown(rows, (("evaluations saved", "evaluations_saved"),
                                           ("blocks saved", "blocks_saved"),
                                           ("accuracy drop (points)", "accuracy_drop_points")))
    print(table)
    path = quality_common.write(args.out, "adaptive-guidance", rows, table, args.samples)
    picture = plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {picture}" if picture else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
