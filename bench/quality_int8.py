"""What W8A8 INT8 costs in sample quality on the digits models, per calibration choice.

    python -m diffrt.bench.quality_int8 --out bench/results [--samples 1000] [--models digits-dit,digits-unet]
                                 [--variants g1,auto,steps,g1-sq,auto-sq,dynamic]

Per model: the fp32 samples (DPM-Solver++(2M), 20 steps, CFG 3, the model cards' noise), then
W8A8 with activation scales per timestep group, calibrated on that plan (``CALIBRATION``: every
class x ``SEEDS`` seeds, CFG 3, MSE clipping), for G = 1 (one shared set, what PTQ4DM / Q-Diffusion /
ModelOpt deploy), G = "auto" and G = steps (one per step), with per-tensor scales and with
SmoothQuant (alpha 0.5), and dynamic per-token quantization for comparison. Reports PSNR, class
accuracy and digits-FID against fp32, with the issue's goals: accuracy drop <= 1 point, FID
within 10%, per-timestep scales better than shared ones. Writes
``<device>-<date>-int8-quality.json`` and a Markdown table beside it.
"""
from __future__ import annotations

import sys

import torch

from diffrt.export import calibrate
from diffrt.runtime import models, optimize

from . import quality_common

SEEDS = (100, 101, 102, 103)  # calibration noise: other seeds than the evaluation's
CALIBRATION = {"guidance_scale": quality_common.GUIDANCE, "method": "mse"}
VARIANTS = {  # --variants key: (row label, calibration options; None: dynamic quantization)
    "g1": ("W8A8 G=1 (shared scales)", {"groups": 1}),
    "auto": ("W8A8 G=auto", {"groups": "auto"}),
    "steps": ("W8A8 G=steps", {"groups": "steps"}),
    "g1-sq": ("W8A8 G=1 SmoothQuant 0.5", {"groups": 1, "smoothquant": 0.5}),
    "auto-sq": ("W8A8 G=auto SmoothQuant 0.5", {"groups": "auto", "smoothquant": 0.5}),
    "dynamic": ("W8A8 dynamic per-token", None),
}


def _make(options):
    def make(den):
        if options is None:
            return optimize(den, int8="dynamic")
        labels = torch.arange(10)
        calibration = calibrate(den, quality_common.SOLVER, quality_common.STEPS, cond=labels,
                                uncond=torch.tensor([models.NULL_CLASS]), seeds=SEEDS, progress=False,
                                **CALIBRATION, **options)
        fast = optimize(den, int8=calibration)
        make.groups = calibration.groups
        return fast
    return make


def main(argv: list[str] | None = None) -> int:
    parser = quality_common.parser("python -m diffrt.bench.quality_int8", __doc__.split("\n")[0], "digits-dit,digits-unet")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    unknown = [key for key in chosen if key not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    quality_common.setup(args)
    rows = []
    with torch.no_grad():
        for name in args.models.split(","):
            makers = {VARIANTS[key][0]: _make(VARIANTS[key][1]) for key in chosen}
            model_rows = quality_common.compare_variants(name, args.samples, {k: (m, None) for k, m in makers.items()})
            for row in model_rows[1:]:
                row["groups"] = getattr(makers[row["configuration"]], "groups", None)
            rows.extend(model_rows)
    table = quality_common.markdown(rows, (("accuracy drop (points)", "accuracy_drop_points"), ("groups", "groups")))
    print(table)
    print(f"wrote {quality_common.write(args.out, 'int8-quality', rows, table, args.samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
