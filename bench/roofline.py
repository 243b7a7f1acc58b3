"""Roofline ESTIMATE per model family on an H100, from the static kernel profile: no GPU involved.

For each attention layer of :data:`diffrt.kernels.compile_variants.ATTENTION_SHAPES` (fp16, dense, and
with ToDo f=2, which keeps a quarter of the keys):

    flops      = 4 * B * H * Lq * Lk * D                (q k^T and p v)
    bytes      = 2 * B * H * D * (2 * Lq + 2 * Lk)      (q, k, v read once, o written once: the compulsory traffic)
    roofline   = max(flops / 989 TFLOP/s, bytes / 3.35 TB/s)   (H100 SXM dense fp16, HBM3)
    fill       = programs / (waves * slots): how full the last wave leaves the GPU, where programs is the
                 launch grid of the tile the untuned path runs and slots = 132 SMs x the CTAs one SM holds
                 (shared memory, registers, threads of that tile, read from the sm_90 static profile)
    estimate   = roofline / fill

Per family: the sum over its attention layers per denoiser forward (``layers`` calls each), and the
fused solver step's bytes per step for its latent (fp32: x, the cond and uncond predictions and the
history slot read, x and the history slot written) at 3.35 TB/s. These are estimates, labelled so
wherever they appear: lower bounds that ignore launch overhead, L2 reuse and the softmax's
non-tensor-core work. ``--measured DIR`` sets the measurements of a GPU run beside them
(``bench_attention``'s JSON: diffrt's dense kernel and SDPA's best backend per case, the same shapes).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from diffrt.kernels.compile_variants import ATTENTION_SHAPES, AttentionShape

H100 = {"name": "H100 SXM (estimate)", "tflops": 989.0, "tbytes_per_s": 3.35, "sms": 132, "shared_per_sm": 233472,
        "shared_per_block_reserved": 1024, "registers_per_sm": 65536, "threads_per_sm": 2048, "blocks_per_sm": 32}
TODO_FACTOR = 2
# Family: latent shape of one sample (fp32 solver state), CFG (two predictions per step), history slots (DPM++ 2M: 1)
SOLVER_STEPS = {"sd15": ((4, 64, 64), True, 1), "sdxl": ((4, 128, 128), True, 1), "dit-xl-2": ((4, 32, 32), True, 1),
                "flux-like": ((16, 128, 128), False, 0), "sd3-like": ((16, 128, 128), True, 0),
                "video-dit": ((16, 8, 64, 64), True, 1)}


def attention_work(shape: AttentionShape, key_fraction: float = 1.0) -> tuple[float, float]:
    """(flops, compulsory bytes) of one fp16 call of ``shape`` keeping ``key_fraction`` of its keys."""
    q_len = math.prod(shape.grid)
    k_len = math.ceil((shape.k_len or q_len) * key_fraction)
    heads = shape.batch * shape.heads
    return 4.0 * heads * q_len * k_len * shape.head_dim, 2.0 * heads * shape.head_dim * (2 * q_len + 2 * k_len)


def ctas_per_sm(row: dict, gpu: dict = H100) -> int:
    """CTAs of a profiled kernel one SM holds: the least of shared memory, registers, threads, blocks."""
    threads = row["num_warps"] * 32
    registers_per_warp = math.ceil(row["registers"] * 32 / 256) * 256  # allocated per warp in units of 256
    limits = [gpu["registers_per_sm"] // (registers_per_warp * row["num_warps"]), gpu["threads_per_sm"] // threads,
              gpu["blocks_per_sm"]]
    if row["shared_bytes"]:
        limits.append(gpu["shared_per_sm"] // (row["shared_bytes"] + gpu["shared_per_block_reserved"]))
    return max(0, min(limits))


def wave_fill(row: dict | None, gpu: dict = H100) -> float | None:
    """programs / (waves * slots) of a profiled launch (None without a profile or a grid)."""
    if row is None or not row.get("grid"):
        return None
    slots = gpu["sms"] * ctas_per_sm(row, gpu)
    if slots == 0:
        return None
    programs = math.prod(row["grid"])
    return programs / (math.ceil(programs / slots) * slots)


def layer_estimate(shape: AttentionShape, row: dict | None, key_fraction: float = 1.0, gpu: dict = H100) -> dict:
    """The estimate of one call (module docstring); ``row``: its sm_90 static profile (fp16)."""
    flops, nbytes = attention_work(shape, key_fraction)
    compute_ms, memory_ms = flops / (gpu["tflops"] * 1e12) * 1e3, nbytes / (gpu["tbytes_per_s"] * 1e12) * 1e3
    fill = wave_fill(row, gpu)
    roofline_ms = max(compute_ms, memory_ms)
    return {"case": shape.case, "family": shape.family, "layers": shape.layers, "key_fraction": key_fraction,
            "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "bound": "compute" if compute_ms >= memory_ms else "memory",
            "roofline_ms": roofline_ms, "ctas_per_sm": ctas_per_sm(row, gpu) if row else None, "wave_fill": fill,
            "estimate_ms": roofline_ms / fill if fill else None}


def solver_step_estimate(family: str, gpu: dict = H100) -> dict | None:
    """Bytes and time of one fused solver step (batch 1, fp32) for the family's latent, or None."""
    if family not in SOLVER_STEPS:
        return None
    latent, cfg, slots = SOLVER_STEPS[family]
    reads, writes = 1 + (2 if cfg else 1) + slots, 1 + slots
    nbytes = 4.0 * math.prod(latent) * (reads + writes)
    return {"latent": list(latent), "reads": reads, "writes": writes, "mbytes": nbytes / 1e6,
            "estimate_us": nbytes / (gpu["tbytes_per_s"] * 1e12) * 1e6}


def _profile_rows(static_rows: list[dict]) -> dict[tuple, dict]:
    """sm_90 fp16 attention rows by (case, todo) with no block mask."""
    return {(row["case"], row["call"].get("todo")): row for row in static_rows
            if row["kernel"] == "attention" and row["dtype"] == "float16" and not row["call"].get("sparse")}


def estimate(static_rows: list[dict], gpu: dict = H100) -> dict[str, Any]:
    """Per layer and per family estimates (module docstring) from the sm_90 static profile's rows."""
    rows = _profile_rows(static_rows)
    layers = []
    for shape in ATTENTION_SHAPES:
        layers.append({**layer_estimate(shape, rows.get((shape.case, None)), 1.0, gpu), "mode": "dense"})
        if "nearest" in {todo for todo, _ in shape.modes()}:
            todo_row = rows.get((shape.case, "nearest"))
            layers.append({**layer_estimate(shape, todo_row, 1 / TODO_FACTOR**2, gpu), "mode": f"todo{TODO_FACTOR}"})
    families = []
    for family in dict.fromkeys(shape.family for shape in ATTENTION_SHAPES):
        dense = [row for row in layers if row["family"] == family and row["mode"] == "dense"]
        if family not in SOLVER_STEPS:
            continue
        known = [row for row in dense if row["estimate_ms"] is not None]
        families.append({"family": family, "attention_calls": sum(row["layers"] for row in dense),
                         "attention_gflop": sum(row["gflop"] * row["layers"] for row in dense),
                         "attention_mbytes": sum(row["mbytes"] * row["layers"] for row in dense),
                         "attention_roofline_ms": sum(row["roofline_ms"] * row["layers"] for row in dense),
                         "attention_estimate_ms": sum(row["estimate_ms"] * row["layers"] for row in known)
                         if len(known) == len(dense) else None,
                         "solver_step": solver_step_estimate(family, gpu)})
    return {"label": "ESTIMATE (static profile + roofline; not a measurement)", "gpu": gpu, "layers": layers,
            "families": families}


def measured_beside(estimates: dict, attention_rows: list[dict]) -> list[dict]:
    """Per dense layer: the estimate, diffrt's measured dense kernel and SDPA's best backend (ms), same shapes."""
    timed = {(row["case"], row["variant"]): row["ms"]["median"] for row in attention_rows if row.get("status") == "ok"}
    out = []
    for layer in (row for row in estimates["layers"] if row["mode"] == "dense"):
        sdpa = [ms for (case, variant), ms in timed.items() if case == layer["case"] and variant.startswith("sdpa-")]
        out.append({"case": layer["case"], "estimate_ms": layer["estimate_ms"],
                    "diffrt_ms": timed.get((layer["case"], "diffrt-dense")), "sdpa_best_ms": min(sdpa, default=None)})
    return out


def _ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(estimates: dict, measured: list[dict] | None = None) -> str:
    """The estimate as Markdown tables (every heading says ESTIMATE); ``measured`` adds a GPU run's column."""
    lines = ["**Roofline ESTIMATE** (H100 SXM: 989 TFLOP/s dense fp16, 3.35 TB/s; no GPU measured these): "
             "max(FLOPs / peak, compulsory bytes / bandwidth) per call, divided by the wave fill of the heuristic "
             "tile's grid (sm_90 static profile). A lower bound: launch overhead, L2 traffic and softmax work are "
             "not in it.", "",
             "| family | attention calls / forward | GFLOP | MB | roofline ms (estimate) | with wave fill, ms "
             "(estimate) | solver step MB | solver step us (estimate) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family in estimates["families"]:
        step = family["solver_step"] or {}
        lines.append(f"| {family['family']} | {family['attention_calls']} | {family['attention_gflop']:.0f} | "
                     f"{family['attention_mbytes']:.0f} | {_ms(family['attention_roofline_ms'], 2)} | "
                     f"{_ms(family['attention_estimate_ms'], 2)} | {_ms(step.get('mbytes'), 1)} | "
                     f"{_ms(step.get('estimate_us'), 1)} |")
    lines += ["", "| layer | mode | GFLOP | MB | bound | CTAs / SM | wave fill | estimate ms / call |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for layer in estimates["layers"]:
        lines.append(f"| {layer['case']} | {layer['mode']} | {layer['gflop']:.2f} | {layer['mbytes']:.1f} | "
                     f"{layer['bound']} | {layer['ctas_per_sm'] or '-'} | {_ms(layer['wave_fill'], 2)} | "
                     f"{_ms(layer['estimate_ms'], 4)} |")
    if measured:
        lines += ["", "| layer (dense) | estimate ms | diffrt measured ms | SDPA best measured ms |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {row['case']} | {_ms(row['estimate_ms'], 4)} | {_ms(row['diffrt_ms'], 4)} | "
                  f"{_ms(row['sdpa_best_ms'], 4)} |" for row in measured]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--static", required=True, help="the sm_90 static profile (static-sm90-<date>-kernels.json)")
    parser.add_argument("--measured", help="a GPU run's folder: its *-attention.json goes beside the estimate")
    parser.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = parser.parse_args(argv)
    estimates = estimate(json.loads(Path(args.static).read_text())["rows"])
    measured = None
    if args.measured:
        found = sorted(Path(args.measured).glob("*-attention.json"))
        if not found:
            raise SystemExit(f"no *-attention.json in {args.measured} (bench_attention's output)")
        measured = measured_beside(estimates, json.loads(found[-1].read_text())["rows"])
    Path(f"{args.out}.json").write_text(json.dumps({**estimates, "measured": measured}, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(markdown(estimates, measured))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
