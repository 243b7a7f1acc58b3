"""One whole adaptive trajectory as one CUDA graph with conditional nodes (issue 19 part 5): syncs and µs per step.

    python -m diffrt.bench.bench_conditional_graphs --out DIR [--device cuda] [--steps 20] [--batch 4]

On the digits DiT (DPM++ 2M, CFG 3, ``--steps`` steps, a batch of ``--batch``), for batch-level adaptive
guidance (threshold 0.95) and whole-batch early exit (threshold 0.2),
:func:`diffrt.runtime.conditional_graphs.capture_adaptive_trajectory` captures every step into one graph;
each row replays it on new noise and reports:

* ``max_abs_err``: the replay against the eager run of the same semantics (the fake backend, checked first);
* ``syncs``: host syncs during one replay (``torch.cuda.set_sync_debug_mode("warn")``; 0 expected);
* ``us_per_step``: median (p20, p80) over ``--repeats`` replays (CUDA events), divided by the steps;
* ``bodies_run``: the conditional bodies that ran of those captured (unconditional passes, segments);

beside the eager Sampler doing the same (its sync-free per-sample paths: ``Sampler.sample``) in the same
process. Without CUDA (``--device cpu``) the fake backend runs: a smoke test, syncs are not counted. The
JSON (``<gpu>-<yyyymmdd>-conditional-graphs.json``) is written through :mod:`diffrt.bench.harness`. Exit status
1 when a replay syncs or differs from the eager run by more than 1e-3.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import time
from typing import Any

import torch
from diffrt.runtime import Sampler, models
from diffrt.runtime.conditional_graphs import capture_adaptive_trajectory
from diffrt.runtime.models.exits import exit_segments

from . import harness

log = logging.getLogger("bench.conditional_graphs")

TOPIC = "conditional-graphs"
TOLERANCE = 1e-3
FEATURES = {  # name -> Sampler options
    "adaptive-guidance": {"adaptive_guidance": 0.95},
    "early-exit-batch": {"early_exit": 0.2, "early_exit_scope": "batch"},
}


def inputs(den, batch: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit noise, class labels and the null class for ``batch`` samples, seeded."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *den.sample_shape, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    null = torch.full((batch,), den.condition_classes - 1)
    return noise.to(device), labels.to(device), null.to(device)


def timing_row(name: str, feature: str, fn, steps: int, device: str, repeats: int) -> dict[str, Any]:
    latency = harness.measure(fn, device, warmup=3, repeats=repeats).stats(1e6 / steps)
    return {"feature": feature, "path": name, "steps": steps, "us_per_step": latency["median"],
            "us_per_step_p20": latency["p20"], "us_per_step_p80": latency["p80"]}


def feature_rows(den, feature: str, args) -> list[dict[str, Any]]:
    """The conditional graph and the eager Sampler for one feature (module docstring)."""
    sampler = Sampler(den, "dpmpp-2m", steps=args.steps, guidance_scale=3.0, **FEATURES[feature])
    segments = exit_segments(den.model, graphs=False) if sampler.early_exit is not None else None
    backend = "cuda" if args.device == "cuda" else "fake"
    start = time.perf_counter()
    runner = capture_adaptive_trajectory(sampler, *inputs(den, args.batch, 0, args.device), backend=backend,
                                         segments=segments)
    harness.sync(args.device)
    capture_s = time.perf_counter() - start
    noise, labels, null = inputs(den, args.batch, 1, args.device)
    eager = capture_adaptive_trajectory(sampler, noise, labels, null, backend="fake", segments=segments)
    harness.sync(args.device)
    with harness.HostSyncCounter(args.device) as counter:
        out = runner(noise, labels, null)
    ran = runner.bodies_run()
    error = (out - eager.output).abs().max().item()
    graph = timing_row("conditional graph", feature, lambda: runner(noise, labels, null), args.steps, args.device,
                       args.repeats)
    graph.update(max_abs_err=error, syncs=counter.count, bodies_run=f"{sum(ran)}/{len(ran)}",
                 capture_s=round(capture_s, 3), batch=args.batch)
    baseline = timing_row("eager Sampler", feature, lambda: sampler.sample(noise, cond=labels, uncond=null, check=False),
                          args.steps, args.device, args.repeats)
    baseline.update(batch=args.batch)
    return [graph, baseline]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_conditional_graphs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--features", default=",".join(FEATURES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    den = models.load("digits-dit", device=args.device)
    rows, failed = [], False
    for feature in args.features.split(","):
        if feature not in FEATURES:
            parser.error(f"--features: unknown {feature!r} (known: {', '.join(FEATURES)})")
        try:
            rows.extend(feature_rows(den, feature, args))
        except Exception as error:  # a failing row is reported, the others still run
            log.exception("%s failed", feature)
            rows.append({"feature": feature, "path": "conditional graph", "error": f"{type(error).__name__}: {error}"})
    for row in rows:
        failed |= "error" in row or bool(row.get("syncs")) or row.get("max_abs_err", 0.0) > TOLERANCE
    print(harness.format_table(rows, [
        ("feature", lambda r: r["feature"]), ("path", lambda r: r["path"]), ("steps", lambda r: r.get("steps")),
        ("µs/step p50", lambda r: r.get("us_per_step")), ("p20", lambda r: r.get("us_per_step_p20")),
        ("p80", lambda r: r.get("us_per_step_p80")), ("syncs", lambda r: r.get("syncs")),
        ("bodies run", lambda r: r.get("bodies_run")), ("max abs err", lambda r: r.get("max_abs_err")),
        ("error", lambda r: r.get("error", ""))]))
    extra = {"cuda_bindings": _version("cuda-bindings"), "model": "digits-dit", "solver": "dpmpp-2m", "guidance_scale": 3.0}
    print(f"wrote {harness.write_results(args.out, TOPIC, rows, harness.environment_stamp(args.device), extra)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
