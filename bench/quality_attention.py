"""What ToDo and block-sparse attention cost in sample quality, on the shipped digits models.

    python -m diffrt.bench.quality_attention --out bench/results [--samples 1000] [--models digits-dit,digits-unet]

For each model, ``samples`` digits (the same number per class, the same seeded noise as the
model card's baselines) are sampled with DPM-Solver++(2M), 20 steps, CFG 3: once with exact
attention (the baseline), then once per configuration of ``CONFIGS``
(:func:`diffrt.bench.quality_common.compare_variants`). Each configuration reports PSNR and relative L2
against the baseline per seed, class accuracy and digits-FID next to the baseline's, and the mean
block-mask density the attention calls saw. Writes ``<device>-<date>-attention-quality.json``
(stamped rows) and a Markdown table beside it.

The digits models are small: the DiT attends over an 8 x 8 token grid (64 tokens), the UNet at
8 x 8 (level 1) and 4 x 4 (level 2), so the configurations force ToDo and sparsity onto those
grids (``min_tokens`` 0 or 64); on large models the defaults start at 4096 / 1024 tokens.
"""
from __future__ import annotations

import sys

import torch

from diffrt.runtime import attention as runtime_attention
from diffrt.runtime import optimize
from diffrt.runtime.attention import Sparse, ToDo

from . import quality_common

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

    def __enter__(self) -> DensityMeter:
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

    def numbers(self) -> dict:
        return {"mask_density": self.total / self.calls if self.calls else None}


def main(argv: list[str] | None = None) -> int:
    args = quality_common.parser("python -m diffrt.bench.quality_attention", __doc__.split("\n")[0], ",".join(CONFIGS)).parse_args(argv)
    quality_common.setup(args)
    rows = []
    with torch.no_grad():
        for name in args.models.split(","):
            variants = {label: (lambda den, options=options: optimize(den, **options), DensityMeter)
                        for label, options in CONFIGS[name].items()}
            rows.extend(quality_common.compare_variants(name, args.samples, variants))
    table = quality_common.markdown(rows, (("mask density", "mask_density"),))
    print(table)
    print(f"wrote {quality_common.write(args.out, 'attention-quality', rows, table, args.samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
