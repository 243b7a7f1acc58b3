"""Attention benchmark: diffrt's Triton kernel against torch SDPA's backends and FlexAttention.

    python -m diffrt.bench.bench_attention --out DIR [--device cuda] [--cases sd15-512,dit-xl-512] [--quick]

Per case (the layers of real models that the static kernel profile and its roofline estimate use,
``diffrt.kernels.compile_variants.ATTENTION_SHAPES``; [B, L, H, D] inputs, fp16, in the same process):

* **dense**: diffrt vs SDPA with each backend forced (flash, efficient, cuDNN; the best is the
  baseline), same inputs seen as [B, H, L, D] views (no copies on either side);
* **todo** (self-attention cases with a token grid): diffrt with ToDo f=2 fused vs "downsample
  K/V (a copy) + SDPA best", and vs dense SDPA best;
* **sparse** (2-D / 3-D token grids): diffrt with a local-window block mask of about 25% density vs
  dense SDPA best and vs FlexAttention (``torch.compile``-d) with the same block mask.

Every variant is checked against the fp32 reference on the same inputs before it is timed
(failures are recorded, not timed). Times: median / p20 / p80 over ``--repeats`` with the L2
flushed before each repeat; TFLOP/s counts the work done (4 * B * H * Lq * Lk_visited * D) and
its fraction of ``--peak-tflops`` (H100 SXM dense fp16: 989). On CPU (``--quick``) only the torch
paths run, at tiny shapes: a smoke test of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffrt.kernels import KVDownsample, attention, attention_masks, attention_reference
from diffrt.kernels.attention_spec import downsample_kv_reference
from diffrt.kernels.compile_variants import ATTENTION_SHAPES

from . import harness

log = logging.getLogger("bench.attention")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, ...]  # query token grid (self-attention)
    k_len: int | None = None  # cross-attention keys (no grid ops); None: self-attention

    @property
    def q_len(self) -> int:
        return math.prod(self.grid)


# The layers of the static profile and its roofline estimate (diffrt.bench.static_profile), then SD1.5 at 1024^2.
CASES = [Case(shape.case, shape.batch, shape.heads, shape.head_dim, shape.grid, shape.k_len)
         for shape in ATTENTION_SHAPES]
CASES += [Case("sd15-1024-l0", 2, 8, 40, (128, 128)), Case("sd15-1024-l1", 2, 8, 80, (64, 64)),
          Case("sd15-1024-l2", 2, 8, 160, (32, 32))]
QUICK = [Case("tiny-2d", 1, 2, 40, (8, 8)), Case("tiny-cross", 1, 2, 72, (6, 6), k_len=11),
         Case("tiny-3d", 1, 2, 64, (2, 4, 8))]
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def _sdpa(q, k, v, backend: str | None):
    """SDPA on [B, L, H, D] tensors seen as [B, H, L, D] views, one backend forced (None: torch's choice);
    the result is seen as [B, L, H, D] again (a view)."""
    def run():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if backend is None:
        return run()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel([names[backend]]):
        return run()


def _window_mask(case: Case, density: float, device) -> Any:
    """A local-window mask whose density is the closest to ``density`` (blocks 128 x 64, SpargeAttn's;
    16 x 16 for the tiny CPU shapes)."""
    q_block, k_block = (128, 64) if case.q_len >= 1024 else (16, 16)
    best = None
    for radius in range(1, max(case.grid) + 1):
        mask = attention_masks.local_window(case.grid, radius, q_block, k_block, device=device)
        if best is None or abs(mask.density - density) < abs(best.density - density):
            best = mask
        if mask.density >= density:
            break
    return best


def _flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    active = mask.active.to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return active[0, 0, q_idx // mask.q_block, kv_idx // mask.k_block]

    block_mask = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device,
                                   BLOCK_SIZE=(mask.q_block, mask.k_block))
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: compiled(qt, kt, vt, block_mask=block_mask).transpose(1, 2)


def _row(case: Case, variant: str, fn: Callable[[], torch.Tensor], reference: torch.Tensor, flops: float,
         args, flush, extra: dict | None = None) -> dict[str, Any]:
    row = {"case": case.name, "variant": variant, "batch": case.batch, "heads": case.heads, "head_dim": case.head_dim,
           "q_len": case.q_len, **(extra or {})}
    try:
        out = fn()
        err = (out.float() - reference).abs().max().item() / max(reference.abs().max().item(), 1e-6)
    except Exception as error:  # noqa: BLE001 - a backend that cannot run this shape is recorded, not timed
        return {**row, "status": f"not measured: {type(error).__name__}: {str(error)[:200]}"}
    row["max_rel_error"] = err
    if not math.isfinite(err) or err > args.tolerance:
        return {**row, "status": f"not timed: error {err:.3g} > {args.tolerance}"}
    timing = harness.measure(fn, args.device, warmup=args.warmup, repeats=args.repeats, setup=flush,
                             max_seconds=args.max_seconds)
    stats = timing.stats(1e3)
    tflops = flops / (stats["median"] / 1e3) / 1e12
    return {**row, "status": "ok", "ms": stats, "tflops": tflops,
            "fraction_of_peak": tflops / args.peak_tflops if args.peak_tflops else None}


def run_case(case: Case, args) -> list[dict[str, Any]]:
    device, dtype = torch.device(args.device), torch.float16 if args.device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    k_len = case.k_len or case.q_len

    def randn(length):
        return torch.randn(case.batch, length, case.heads, case.head_dim, generator=gen, device=device, dtype=dtype)

    q, k, v = randn(case.q_len), randn(k_len), randn(k_len)
    flush = harness.L2Flush(device) if device.type == "cuda" else None
    dense_flops = 4.0 * case.batch * case.heads * case.q_len * k_len * case.head_dim
    reference = attention_reference(q, k, v).float()
    rows = []
    baselines = [None] if device.type != "cuda" else list(SDPA_BACKENDS)
    for backend in baselines:
        rows.append(_row(case, f"sdpa-{backend or 'default'}", lambda b=backend: _sdpa(q, k, v, b), reference,
                         dense_flops, args, flush))
    diffrt_backend = "triton" if device.type == "cuda" else "torch"
    rows.append(_row(case, "diffrt-dense", lambda: attention(q, k, v, backend=diffrt_backend), reference, dense_flops,
                     args, flush))
    if case.k_len is None and len(case.grid) == 2:
        spec = KVDownsample(case.grid, 2, "nearest")
        todo_ref = attention_reference(q, k, v, kv_downsample=spec).float()
        todo_flops = dense_flops * spec.out_tokens / k_len
        best = _best(rows)
        rows.append(_row(case, "downsample+sdpa", lambda: _sdpa(q, downsample_kv_reference(k, spec),
                                                               downsample_kv_reference(v, spec), best), todo_ref,
                         todo_flops, args, flush, {"todo_factor": 2}))
        rows.append(_row(case, "diffrt-todo2", lambda: attention(q, k, v, kv_downsample=spec, backend=diffrt_backend),
                         todo_ref, todo_flops, args, flush, {"todo_factor": 2}))
    if case.k_len is None and len(case.grid) in (2, 3):  # a local window needs a 2-D / 3-D token grid
        mask = _window_mask(case, 0.25, device)
        sparse_ref = attention_reference(q, k, v, block_mask=mask).float()
        sparse_flops = dense_flops * mask.density
        extra = {"density": mask.density}
        rows.append(_row(case, "diffrt-sparse", lambda: attention(q, k, v, block_mask=mask, backend=diffrt_backend),
                         sparse_ref, sparse_flops, args, flush, extra))
        if device.type == "cuda":
            try:
                flex = _flex(q, k, v, mask)
            except Exception as error:  # noqa: BLE001
                rows.append({"case": case.name, "variant": "flex-sparse", "status": f"not measured: {error}"[:200]})
            else:
                rows.append(_row(case, "flex-sparse", flex, sparse_ref, sparse_flops, args, flush, extra))
    _speedups(rows)
    return rows


def _best(rows: list[dict]) -> str | None:
    """The fastest measured SDPA backend of a case (None: torch's own choice)."""
    timed = [r for r in rows if r["variant"].startswith("sdpa-") and r.get("status") == "ok"]
    if not timed:
        return None
    name = min(timed, key=lambda r: r["ms"]["median"])["variant"][len("sdpa-"):]
    return None if name == "default" else name


def _speedups(rows: list[dict]) -> None:
    """speedup_vs_sdpa_best = best dense SDPA median / this variant's median, on every timed row."""
    timed = [r for r in rows if r["variant"].startswith("sdpa-") and r.get("status") == "ok"]
    if not timed:
        return
    best = min(r["ms"]["median"] for r in timed)
    for row in rows:
        if row.get("status") == "ok":
            row["speedup_vs_sdpa_best"] = best / row["ms"]["median"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="cap on one variant's timed repeats")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="largest max-abs error / max|ref| accepted")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense fp16 peak")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cases = QUICK if args.quick else CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in CASES + QUICK if c.name in wanted]
    stamp = harness.environment_stamp(args.device)
    rows = []
    for case in cases:
        with torch.no_grad():
            rows.extend(run_case(case, args))
    print(harness.format_table(rows, [
        ("case", lambda r: r["case"]), ("variant", lambda r: r["variant"]),
        ("ms", lambda r: r.get("ms", {}).get("median")), ("TFLOP/s", lambda r: r.get("tflops")),
        ("x SDPA best", lambda r: r.get("speedup_vs_sdpa_best")), ("density", lambda r: r.get("density")),
        ("status", lambda r: r.get("status"))]))
    path = harness.write_results(args.out, "attention", rows, stamp)
    print(f"wrote {path}")
    return 0 if all(r.get("status") == "ok" or r["variant"].startswith(("sdpa-", "flex")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
