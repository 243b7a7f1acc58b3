"""accelerate(pipe) against the pipeline itself: every family with its default scheduler and the ones its users
swap in, the relative error of the accelerated output (fp32, CPU, tiny random configs: :mod:`diffrt.bench.pipelines`).

    python -m diffrt.bench.pipeline_parity --out bench/results

For context each row also gives diffusers' own sensitivity: the relative change of the original pipeline's
output when its initial latents are perturbed by 1e-7 (relative), i.e. what one rounding difference at the
start becomes by the end under that model and guidance scale (empty where the pipeline takes no latents).
Writes ``<device>-<yyyymmdd>-pipeline-parity.json`` and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffrt.runtime import accelerate, restore
from diffrt.runtime.pipeline import acceleration_of

from . import harness
from .pipelines import FAMILIES, relative_error

SD_SWAPS = [("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            ("DPMSolverMultistepScheduler", {"solver_order": 3}),
            ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
            ("DPMSolverSinglestepScheduler", {}), ("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
            ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}),
            ("LMSDiscreteScheduler", {}), ("UniPCMultistepScheduler", {}), ("DEISMultistepScheduler", {}),
            ("DDIMScheduler", {}), ("PNDMScheduler", {}), ("LCMScheduler", {}), ("TCDScheduler", {})]
SWAPS: dict[str, list[tuple[str, dict]]] = {
    "sd15": SD_SWAPS,
    "sd15-img2img": [("DPMSolverMultistepScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("DDIMScheduler", {}),
                     ("UniPCMultistepScheduler", {}), ("LMSDiscreteScheduler", {}), ("DPMSolverSinglestepScheduler", {}),
                     ("DEISMultistepScheduler", {}), ("HeunDiscreteScheduler", {})],
    "sd-turbo": [("EulerAncestralDiscreteScheduler", {}), ("DDIMScheduler", {}), ("LCMScheduler", {})],
    "sdxl": [("EulerAncestralDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
             ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}), ("UniPCMultistepScheduler", {}),
             ("DDIMScheduler", {}), ("EDMEulerScheduler", {}), ("EDMDPMSolverMultistepScheduler", {}),
             ("TCDScheduler", {}), ("LCMScheduler", {})],
    "lcm": [],  # LatentConsistencyModelPipeline passes eta=None, which TCD (in diffusers) cannot take
    "pixart-alpha": [("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("DDIMScheduler", {}),
                     ("UniPCMultistepScheduler", {})],
    "pixart-sigma": [("EulerDiscreteScheduler", {}), ("DDIMScheduler", {})],
    "dit": [("DDIMScheduler", {}), ("EulerDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})],
    "sd3": [("FlowMatchHeunDiscreteScheduler", {}), ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True})],
    "flux-schnell": [("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True})],  # stochastic_sampling:
    # FluxPipeline passes no generator to step(), so diffusers' own output is not reproducible there
    "flux-dev": [("FlowMatchEulerDiscreteScheduler", {"time_shift_type": "linear"})],
    "ltx-video": [],
    "wan": [("UniPCMultistepScheduler", {"flow_shift": 5.0}), ("FlowMatchEulerDiscreteScheduler", {"shift": 5.0})],
}
PERTURBATION = 1e-7
README_START, README_END = "<!-- pipeline-parity:start -->", "<!-- pipeline-parity:end -->"


def _run(pipe, kwargs: dict[str, Any], seed: int, latents: torch.Tensor | None = None):
    extra = {} if latents is None else {"latents": latents}
    out = pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(seed))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)  # video pipelines return frames


def _sensitivity(pipe, kwargs: dict[str, Any], seed: int, reference: torch.Tensor) -> float | None:
    """How far the original pipeline moves when its initial latents move by PERTURBATION (relative)."""
    latents = getattr(pipe, "_diffrt_latents", None)
    if latents is None:
        return None
    moved = _run(pipe, kwargs, seed, latents * (1 + PERTURBATION))
    return relative_error(moved, _run(pipe, kwargs, seed, latents))


def measure(family: str, scheduler: str | None, options: dict, seeds: tuple[int, ...]) -> dict[str, Any]:
    """One row: the worst relative error of the accelerated pipeline over ``seeds``, and the context columns."""
    import diffusers  # noqa: PLC0415

    pipe, kwargs = FAMILIES[family]()
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
    row = {"family": family, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
           "options": options, "default": scheduler is None, "steps": kwargs.get("num_inference_steps"),
           "guidance_scale": kwargs.get("guidance_scale")}
    errors, sensitivities, fallback = [], [], None
    for seed in seeds:
        reference = _run(pipe, kwargs, seed)
        latents = _initial_latents(pipe, kwargs, seed)
        if latents is not None:
            pipe._diffrt_latents = latents
            sensitivities.append(_sensitivity(pipe, kwargs, seed, reference))
            del pipe._diffrt_latents
        accelerate(pipe)
        errors.append(relative_error(_run(pipe, kwargs, seed), reference))
        fallback = fallback or acceleration_of(pipe).fallback
        restore(pipe)
    row.update(max_relative_error=max(errors), fused_step=fallback is None, fallback=fallback,
               diffusers_sensitivity=max(sensitivities) if sensitivities else None)
    return row


def _initial_latents(pipe, kwargs: dict[str, Any], seed: int) -> torch.Tensor | None:
    """The unit-scale latents the pipeline draws from this seed (read through its own prepare_latents), or None
    for a pipeline that takes no ``latents`` (img2img, DiT)."""
    import inspect  # noqa: PLC0415

    if "latents" not in inspect.signature(type(pipe).__call__).parameters or "image" in kwargs:
        return None
    captured: dict[str, Any] = {}
    original = pipe.prepare_latents

    def spy(*args, **kw):
        latents = original(*args, **kw)
        first = latents[0] if isinstance(latents, tuple) else latents
        captured.setdefault("latents", first / getattr(pipe.scheduler, "init_noise_sigma", 1.0))
        return latents

    pipe.prepare_latents = spy
    try:
        _run(pipe, kwargs, seed)
    finally:
        del pipe.prepare_latents
    return captured.get("latents")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.pipeline_parity", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and the markdown table")
    parser.add_argument("--families", default=None, help="comma-separated subset of " + ", ".join(FAMILIES))
    parser.add_argument("--seeds", type=int, default=2, help="seeds per row (the worst error is kept)")
    parser.add_argument("--readme", action="store_true", help="also write the table into README.md (between its "
                        "pipeline-parity markers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    families = args.families.split(",") if args.families else list(FAMILIES)
    seeds = tuple(range(args.seeds))
    rows = []
    for family in families:
        for scheduler, options in [(None, {}), *SWAPS.get(family, [])]:
            rows.append(measure(family, scheduler, options, seeds))
    stamp = harness.environment_stamp("cpu")
    path = harness.write_results(args.out, "pipeline-parity", rows, stamp)
    table = render(rows)
    Path(path).with_suffix(".md").write_text(table + "\n")
    if args.readme:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        text = readme.read_text()
        start, end = text.index(README_START) + len(README_START), text.index(README_END)
        readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(table)
    print(f"wrote {path}")
    return 0 if all(r["fused_step"] and r["max_relative_error"] <= 1e-5 for r in rows) else 1


def render(rows: list[dict[str, Any]]) -> str:
    """family -> default scheduler -> swaps tested -> max relative error, as a markdown table."""
    lines = ["| family (pipeline) | default scheduler | swaps tested | max relative error | diffusers' own sensitivity |",
             "| --- | --- | --- | --- | --- |"]
    for family in dict.fromkeys(r["family"] for r in rows):
        own = [r for r in rows if r["family"] == family]
        default = next(r for r in own if r["default"])
        swaps = [r["scheduler"].replace("Scheduler", "") + (f" {_options(r['options'])}" if r["options"] else "")
                 for r in own if not r["default"]]
        worst = max(r["max_relative_error"] for r in own)
        sensitivity = [r["diffusers_sensitivity"] for r in own if r["diffusers_sensitivity"] is not None]
        failed = [r["scheduler"] for r in own if not r["fused_step"]]
        note = f" (diffusers' step ran: {', '.join(failed)})" if failed else ""
        lines.append(f"| {family} ({default['pipeline']}) | {default['scheduler'].replace('Scheduler', '')} | "
                     f"{', '.join(swaps) or '-'} | {worst:.1e}{note} | "
                     f"{max(sensitivity):.1e} |" if sensitivity else
                     f"| {family} ({default['pipeline']}) | {default['scheduler'].replace('Scheduler', '')} | "
                     f"{', '.join(swaps) or '-'} | {worst:.1e}{note} | - |")
    return "\n".join(lines)


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


if __name__ == "__main__":
    sys.exit(main())
