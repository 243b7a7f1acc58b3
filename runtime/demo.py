"""``diffrt demo``: the embedded default, on the shipped reference model.

Samples one row per digit (classes 0-9) from ``digits-dit`` twice on the same noise: with the
plain fp32 reference configuration (PyTorch reference step, DPM-Solver++(2M), 50 steps) and with
the default fast configuration of this device (``optimize()``: diffrt attention, the Triton kernel
on CUDA; the compiled step kernel; 20 steps; on CUDA fp16), writes both grids as PNG, and prints a
table: configuration, ms per image, speedup, PSNR vs the reference, class accuracy.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models, quality
from .optimized import optimize
from .sampler import Sampler

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """One sampling configuration of the demo."""

    name: str
    solver: str
    steps: int
    dtype: torch.dtype
    backend: str
    optimized: bool = False


def default_configs(device: torch.device, reference_steps: int = 50, fast_steps: int = 20) -> list[DemoConfig]:
    """[reference, fast] for ``device``: the fp32 reference and this device's fast default."""
    reference = DemoConfig(f"reference fp32 (dpmpp-2m, {reference_steps} steps, PyTorch step)", "dpmpp-2m",
                           reference_steps, torch.float32, "reference")
    fast_dtype = torch.float16 if device.type == "cuda" else torch.float32
    fast = DemoConfig(f"fast {str(fast_dtype).replace('torch.', '')} (dpmpp-2m, {fast_steps} steps, optimize())",
                      "dpmpp-2m", fast_steps, fast_dtype, "auto", optimized=True)
    return [reference, fast]


def run_demo(out_dir: str | Path = "demo-out", rows: int = 1, guidance_scale: float = 3.0, seed: int = 0,
             device: str | torch.device | None = None, configs: list[DemoConfig] | None = None,
             reference_steps: int = 50, fast_steps: int = 20) -> list[dict]:
    """Sample ``rows`` rows of digits 0-9 per configuration (default: :func:`default_configs`);
    write the grids; return the table rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = configs or default_configs(device, reference_steps, fast_steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(10, device=device).repeat(rows)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed)).to(device)
    classifier = models.load_classifier(device=device)
    results, reference_images = [], None
    for config in configs:
        den = models.load("digits-dit", device=device, dtype=config.dtype)
        if config.optimized:
            den = optimize(den)
        sampler = Sampler(den, config.solver, config.steps, guidance_scale=guidance_scale, backend=config.backend)
        uncond = torch.full_like(labels, models.NULL_CLASS)
        with torch.no_grad():  # warm-up: one guided model call at the batch size, the sampler's tables
            den(torch.cat([noise, noise]), sampler.tables(device)[2][:1].expand(2 * len(noise)),
                torch.cat([uncond, labels]))
            start = time.perf_counter()
            images = sampler.sample(noise, cond=labels, uncond=uncond).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        images = images.clamp(-1, 1)
        reference_images = images if reference_images is None else reference_images
        path = out_dir / f"grid-{len(results)}-{config.solver}-{config.steps}.png"
        save_grid(images, path, columns=10)
        results.append({
            "configuration": config.name,
            "ms_per_image": 1e3 * seconds / len(labels),
            "psnr_vs_reference": quality.psnr(images, reference_images).mean().item(),
            "class_accuracy": quality.class_accuracy(images, labels, classifier),
            "grid": str(path),
        })
    for row in results:
        row["speedup"] = results[0]["ms_per_image"] / row["ms_per_image"]
    return results


def format_table(results: list[dict]) -> str:
    """The demo's table as text."""
    lines = [f"{'configuration':<52} {'ms/image':>9} {'speedup':>8} {'PSNR dB':>8} {'accuracy':>9}"]
    for row in results:
        lines.append(f"{row['configuration']:<52} {row['ms_per_image']:>9.2f} {row['speedup']:>7.2f}x "
                     f"{row['psnr_vs_reference']:>8.2f} {100 * row['class_accuracy']:>8.1f}%")
    return "\n".join(lines)


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 10, scale: int = 4) -> None:
    """Write images [N, 1, H, W] in [-1, 1] as one PNG grid (``scale``x nearest upsampling)."""
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow comes with the test extra (diffusers)
        raise ImportError("writing PNG grids needs Pillow: pip install pillow (or the 'test' extra)") from exc
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    canvas = torch.zeros(rows * h, columns * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    canvas = canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    Image.fromarray(canvas.numpy(), mode="L").save(path)
