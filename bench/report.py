"""What ``diffrt bench`` prints and writes: the terminal table, the stamped JSON and the PNG chart.

The JSON (``<gpu-or-cpu>-<yyyymmdd>-bench-<model>.json`` through :func:`harness.write_results`):
``{"topic", "stamp", "workload", "settings", "rows": [...]}``; each row has ``config``, ``kind``
(baseline / diffrt), ``status`` (ok / unstable: timed, but p99 far above p50 / skipped / error /
quality-fail), ``note``, ``latency_ms``
({median, p90, p99, p20, p80, min, mean}), ``repeats``, ``throughput_per_s``, ``speedup``
({baseline: x}), ``psnr_db`` / ``psnr_min_db`` (vs the fp32 reference, same noise),
``peak_memory_mib`` (CUDA), ``setup_s``, ``first_call_s`` and for diffrt rows ``exact``,
``acceleration`` and ``acceleration_config`` (an :class:`~diffrt.runtime.acceleration.Acceleration`),
plus the stamp (GPU, driver, CUDA, torch, triton, git SHA).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from . import harness

log = logging.getLogger(__name__)

_NUMBER = {"type": "number"}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
_LATENCY = {"type": "object", "required": ["median", "p90", "p99"],
            "properties": {k: {"type": "number", "exclusiveMinimum": 0} for k in ("median", "p90", "p99", "p20", "p80",
                                                                              "min", "mean")}}
ROW_SCHEMA = {
    "type": "object",
    "required": ["config", "kind", "status", "stamp"],
    "properties": {
        "config": {"type": "string"}, "kind": {"enum": ["baseline", "diffrt"]},
        "status": {"enum": ["ok", "unstable", "skipped", "error", "quality-fail"]}, "note": {"type": "string"},
        "latency_ms": _LATENCY, "repeats": {"type": "integer", "minimum": 1},
        "throughput_per_s": {"type": "number", "exclusiveMinimum": 0},
        "speedup": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
        "psnr_db": _NUMBER, "psnr_min_db": _NUMBER, "peak_memory_mib": _OPTIONAL_NUMBER,
        "setup_s": {"type": "number", "minimum": 0}, "first_call_s": {"type": "number", "minimum": 0},
        "exact": {"type": "boolean"}, "acceleration": {"type": "string"}, "acceleration_config": {"type": "object"},
        "stamp": {"type": "object"},
    },
    "allOf": [{"if": {"properties": {"status": {"enum": ["ok", "unstable", "quality-fail"]}}},
               "then": {"required": ["latency_ms", "repeats", "throughput_per_s", "speedup", "setup_s",
                                     "first_call_s"]}},
              {"if": {"properties": {"status": {"enum": ["unstable", "skipped", "error"]}}},
               "then": {"required": ["note"]}}],
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "diffrt bench result",
    "type": "object",
    "required": ["topic", "stamp", "workload", "settings", "rows"],
    "properties": {
        "topic": {"type": "string", "pattern": "^bench-"},
        "stamp": {"type": "object", "required": ["device_type", "torch", "triton", "git_sha", "source_hash", "utc"],
                  "if": {"properties": {"device_type": {"const": "cuda"}}},
                  "then": {"required": ["gpu_name", "compute_capability", "driver", "cuda"]}},
        "workload": {"type": "object", "required": ["model", "sample_shape", "solver", "steps"]},
        "settings": {"type": "object", "required": ["batch", "solver", "steps", "dtype", "device", "reference"]},
        "rows": {"type": "array", "minItems": 1, "items": ROW_SCHEMA},
    },
}
"""The JSON schema of a ``diffrt bench`` result file (``jsonschema.validate(document, SCHEMA)``)."""


def _speedup(name: str):
    return lambda r: (r.get("speedup") or {}).get(name)


def table(result: dict[str, Any]) -> str:
    """The terminal table: one line per configuration."""
    w, s = result["workload"], result["settings"]
    columns = [("config", lambda r: r["config"]), ("status", lambda r: r["status"]),
               ("p50 ms", lambda r: r.get("latency_ms", {}).get("median")),
               ("p90 ms", lambda r: r.get("latency_ms", {}).get("p90")),
               ("p99 ms", lambda r: r.get("latency_ms", {}).get("p99")),
               ("samples/s", lambda r: r.get("throughput_per_s")),
               ("x eager", _speedup("diffusers-eager")), ("x compile", _speedup("diffusers-compile")),
               ("PSNR dB", lambda r: r.get("psnr_db")), ("peak MiB", lambda r: r.get("peak_memory_mib")),
               ("setup s", lambda r: r.get("setup_s")), ("1st call s", lambda r: r.get("first_call_s")),
               ("what", lambda r: r.get("acceleration") or r.get("note") or "")]
    head = (f"diffrt bench: {w['model']} ({w['description']}), batch {s['batch']}, {s['solver']} {s['steps']} steps, "
            f"CFG {s['guidance_scale']}, {s['dtype']} on {s['device']}; PSNR vs {s['reference']}")
    notes = [f"  {r['config']}: {r['note']}" for r in result["rows"] if r.get("note") and r["status"] != "skipped"]
    return "\n".join([head, harness.format_table(result["rows"], columns), *notes])


def write_json(out_dir: str | Path, result: dict[str, Any], stamp: dict[str, Any]) -> Path:
    name = Path(result["workload"]["model"]).name
    return harness.write_results(out_dir, f"bench-{name}", result["rows"], stamp,
                                 extra={"workload": result["workload"], "settings": result["settings"]})


def chart(result: dict[str, Any], path: str | Path, stamp: dict[str, Any]) -> Path | None:
    """Two panels: p50 latency per configuration (speedup over eager on each bar) and PSNR; None
    (logged) without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        log.warning("no chart: matplotlib is not installed (pip install matplotlib)")
        return None
    rows = [r for r in result["rows"] if r["status"] in ("ok", "unstable", "quality-fail")]
    if not rows:
        log.warning("no chart: no configuration was timed")
        return None
    names = [r["config"] for r in rows]
    latency = [r["latency_ms"]["median"] for r in rows]
    colors = ["#888888" if r["kind"] == "baseline" else ("#1f77b4" if r.get("exact") else "#ff7f0e") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    left.barh(names, latency, color=colors)
    for i, r in enumerate(rows):
        x = r.get("speedup", {}).get("diffusers-eager")
        if x is not None:
            left.text(latency[i], i, f" {x:.2f}x", va="center", fontsize=8)
    left.set_xlabel("p50 latency per batch (ms)")
    left.invert_yaxis()
    psnr = [min(r.get("psnr_db", math.nan), 100.0) for r in rows]
    right.barh(names, psnr, color=colors)
    right.set_xlabel("PSNR vs the fp32 reference (dB, capped at 100)")
    w, s = result["workload"], result["settings"]
    device = stamp.get("gpu_name") or stamp.get("cpu_model") or s["device"]
    fig.suptitle(f"{w['model']}: batch {s['batch']}, {s['solver']} {s['steps']} steps, {s['dtype']}, {device} "
                 f"({str(stamp.get('utc', ''))[:10]}); grey baselines, blue exact, orange approximate", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
