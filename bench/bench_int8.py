"""INT8 benchmark: W8A8 GEMMs at real model shapes and end-to-end denoiser steps, INT8 vs fp16.

    python -m diffrt.bench.bench_int8 --out DIR [--device cuda] [--batches 1,2,8] [--e2e] [--quick]

* **layers**: the linear shapes of SD1.5 and SDXL UNet transformer blocks (q/k/v/out, GEGLU in,
  FF out) at their token counts and of DiT-XL/2 (qkv, proj, MLP) at 256^2 and 512^2, times the
  model batch (CFG doubles it). Variants: fp16 ``F.linear`` (cuBLAS: what a model runs without
  INT8, diffrt's fp16 path included), diffrt's INT8 from an fp16 input (per-row static scales,
  quantized in the GEMM's prologue), the same from a pre-quantized int8 input (the GEMM alone),
  and ``torch._int_mm`` + the PyTorch epilogue. Each checked against the integer reference first.
* **e2e** (``--e2e``, CUDA): one UNet / DiT step (random weights, the real architectures)
  fp16 vs diffrt fp16 (``optimize``) vs diffrt W8A8 (``optimize(int8="dynamic")`` and with a
  per-layer speed policy from :func:`diffrt.export.speed.measure_layers`), with the layers that
  gain and those that do not.

TOPS count 2 * M * N * K. On CPU (``--quick``) a few small shapes run through the torch paths: a
smoke test of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffrt.kernels.int8_launch import int8_linear
from diffrt.kernels.int8_spec import dynamic_row_scale, int8_linear_reference, quantize, quantize_weight

from . import harness

log = logging.getLogger("bench.int8")


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    tokens: int  # per sample
    k: int
    n: int


SD15 = [(4096, 320), (1024, 640), (256, 1280)]
SDXL = [(4096, 640), (1024, 1280)]
LAYERS = [Shape("sd15", f"{name}@{tokens}", tokens, k, n) for tokens, dim in SD15
          for name, k, n in (("qkvo", dim, dim), ("geglu", dim, 8 * dim), ("ff_out", 4 * dim, dim))]
LAYERS += [Shape("sdxl", f"{name}@{tokens}", tokens, k, n) for tokens, dim in SDXL
           for name, k, n in (("qkvo", dim, dim), ("geglu", dim, 8 * dim), ("ff_out", 4 * dim, dim))]
LAYERS += [Shape("dit-xl-2", f"{name}@{tokens}", tokens, k, n) for tokens in (256, 1024)
           for name, k, n in (("qkv", 1152, 3456), ("proj", 1152, 1152), ("mlp_in", 1152, 4608),
                              ("mlp_out", 4608, 1152))]
QUICK = [Shape("tiny", "a", 64, 128, 96), Shape("tiny", "b", 16, 96, 200)]


def layer_rows(shape: Shape, batch: int, args) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    m = batch * shape.tokens
    x = torch.randn(m, shape.k, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(shape.n, shape.k, generator=gen, device=device, dtype=dtype) / shape.k ** 0.5
    bias = torch.randn(shape.n, generator=gen, device=device, dtype=dtype)
    w_q, w_scale = quantize_weight(weight)
    row_scale = dynamic_row_scale(x)
    x_q = quantize(x, row_scale[:, None])
    expected = int8_linear_reference(x_q.cpu(), w_q.cpu(), w_scale.cpu(), row_scale.cpu(), bias.cpu()).float()
    flush = harness.L2Flush(device) if device.type == "cuda" else None
    backend = "triton" if device.type == "cuda" else "torch"
    variants = {
        "fp16-linear" if device.type == "cuda" else "float-linear": (lambda: F.linear(x, weight, bias), False),
        "diffrt-int8": (lambda: int8_linear(x, w_q, w_scale, row_scale, bias, backend=backend), True),
        "diffrt-int8-prequantized": (lambda: int8_linear(x_q, w_q, w_scale, row_scale, bias, out_dtype=dtype,
                                                         backend=backend), True),
        "torch-int_mm": (lambda: int8_linear(x_q, w_q, w_scale, row_scale, bias, out_dtype=dtype, backend="torch"),
                         True),
    }
    rows = []
    for variant, (fn, is_int8) in variants.items():
        row = {"model": shape.model, "layer": shape.layer, "batch": batch, "m": m, "k": shape.k, "n": shape.n,
               "variant": variant}
        try:
            out = fn().float().cpu()
        except Exception as error:  # noqa: BLE001 - recorded, not timed
            rows.append({**row, "status": f"not measured: {type(error).__name__}: {str(error)[:160]}"})
            continue
        reference = expected if is_int8 else F.linear(x.float(), weight.float(), bias.float()).cpu()
        err = ((out - reference).abs().max() / reference.abs().max()).item()
        if err > (2e-2 if is_int8 else 5e-3):
            rows.append({**row, "status": f"not timed: error {err:.3g}", "max_rel_error": err})
            continue
        stats = harness.measure(fn, device, warmup=args.warmup, repeats=args.repeats, setup=flush,
                                max_seconds=args.max_seconds).stats(1e3)
        rows.append({**row, "status": "ok", "max_rel_error": err, "ms": stats,
                     "tops": 2 * m * shape.k * shape.n / (stats["median"] / 1e3) / 1e12})
    base = next((r for r in rows if r["variant"].endswith("-linear") and r["status"] == "ok"), None)
    for row in rows:
        if base is not None and row["status"] == "ok":
            row["speedup_vs_fp16"] = base["ms"]["median"] / row["ms"]["median"]
    return rows


def e2e_rows(args) -> list[dict[str, Any]]:
    """One denoiser step of SD1.5-sized UNet and DiT-XL/2 (random weights), fp16 vs diffrt fp16 vs W8A8."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel  # noqa: PLC0415

    from diffrt.export.speed import measure_layers, speed_policy  # noqa: PLC0415
    from diffrt.runtime import Denoiser, optimize  # noqa: PLC0415

    device, dtype = torch.device("cuda"), torch.float16
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    rows = []
    for name, build, make_cond in (
        ("sd15-unet", lambda: UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
         lambda b: torch.randn(b, 77, 768, device=device, dtype=dtype)),
        ("dit-xl-2", lambda: DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                                   sample_size=32, patch_size=2, in_channels=4, out_channels=8,
                                                   num_embeds_ada_norm=1000),
         lambda b: torch.randint(0, 1000, (b,), device=device)),
    ):
        den = Denoiser.from_diffusers(build().to(device, dtype).eval(), schedule)
        for batch in args.batch_list:
            x = torch.randn(batch, *den.sample_shape, device=device, dtype=dtype)
            t, cond = torch.full((batch,), 500.0, device=device), make_cond(batch)
            speeds = measure_layers(den, x, t, cond)
            configs = {"torch fp16": den, "diffrt fp16": optimize(den), "diffrt W8A8 all": optimize(den, int8="dynamic"),
                       "diffrt W8A8 where it pays": optimize(den, int8="dynamic", int8_policy=speed_policy(speeds))}
            timed = {}
            for label, variant in configs.items():
                with torch.no_grad():
                    stats = harness.measure(lambda v=variant: v(x, t, cond), device, warmup=3, repeats=args.repeats,
                                            max_seconds=args.max_seconds).stats(1e3)
                timed[label] = stats["median"]
                rows.append({"model": name, "batch": batch, "variant": label, "status": "ok", "ms": stats})
            for row in rows[-len(configs):]:
                row["speedup_vs_torch_fp16"] = timed["torch fp16"] / row["ms"]["median"]
            rows.append({"model": name, "batch": batch, "variant": "layer speeds", "status": "ok",
                         "layers": [{"name": s.name, "rows": s.rows, "k": s.in_features, "n": s.out_features,
                                     "float_ms": s.float_ms, "int8_ms": s.int8_ms, "speedup": s.speedup}
                                    for s in speeds]})
            from diffrt.export import quant  # noqa: PLC0415

            quant.uninstall(den.model)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_int8", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,2,8")
    parser.add_argument("--e2e", action="store_true", help="also time whole denoiser steps (CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    with torch.no_grad():
        for shape in QUICK if args.quick else LAYERS:
            for batch in args.batch_list:
                rows.extend(layer_rows(shape, batch, args))
    if args.e2e and args.device == "cuda":
        rows.extend(e2e_rows(args))
    print(harness.format_table([r for r in rows if "layer" in r], [
        ("model", lambda r: r["model"]), ("layer", lambda r: r["layer"]), ("batch", lambda r: r["batch"]),
        ("variant", lambda r: r["variant"]), ("ms", lambda r: r.get("ms", {}).get("median")),
        ("TOPS", lambda r: r.get("tops")), ("x fp16", lambda r: r.get("speedup_vs_fp16")),
        ("status", lambda r: r["status"])]))
    path = harness.write_results(args.out, "int8", rows, harness.environment_stamp(args.device))
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" or r["variant"] == "torch-int_mm" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
