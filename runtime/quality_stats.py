"""Sample-comparison statistics shared by tests, the CLI and benchmarks."""
from __future__ import annotations

import math

import torch


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference|, in float64 (inf when either is non-finite)."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    a, b = candidate.detach().double().cpu(), reference.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
