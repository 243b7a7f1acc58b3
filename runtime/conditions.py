"""Conditions as the Sampler passes them to a denoiser: a tensor, or a dict of named tensors.

A model with one condition takes a tensor per sample (class labels [B], text embeddings [B, L, D]). A
model with several takes a dict, each entry batched the same way, e.g. SDXL's
``{"encoder_hidden_states": [B, 77, 2048], "text_embeds": [B, 1280], "time_ids": [B, 6]}`` (the names are
the model's keyword arguments; :mod:`diffrt.runtime.diffusers_models` lists them per model class). An
entry with batch 1 is broadcast to the batch. Classifier-free guidance concatenates ``[uncond; cond]``
entry by entry; adaptive guidance selects rows entry by entry; the Denoiser casts floating entries to
the model's dtype.
"""
from __future__ import annotations

from typing import Any

import torch


def is_condition(value: Any) -> bool:
    """A tensor or a dict of tensors (None entries allowed)."""
    if torch.is_tensor(value):
        return True
    return isinstance(value, dict) and all(v is None or torch.is_tensor(v) for v in value.values())


def expand(cond: Any, batch: int) -> Any:
    """Entries of batch 1 broadcast to ``batch`` rows."""
    if torch.is_tensor(cond):
        return cond.expand(batch, *cond.shape[1:]) if cond.dim() and cond.shape[0] == 1 and batch != 1 else cond
    if isinstance(cond, dict):
        return {k: None if v is None else expand(v, batch) for k, v in cond.items()}
    return cond


def cat(uncond: Any, cond: Any) -> Any:
    """[uncond; cond] along the batch (dicts entry by entry; uncond of batch 1 broadcast to cond's batch)."""
    if torch.is_tensor(cond) and torch.is_tensor(uncond):
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond shape {tuple(uncond.shape)} does not match cond shape {tuple(cond.shape)}")
        if uncond.shape[0] != cond.shape[0]:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([uncond, cond])
    if isinstance(cond, dict) and isinstance(uncond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"uncond has entries {sorted(uncond)}, cond {sorted(cond)}: give both the same names")
        batch = batch_of(cond)
        return {k: None if cond[k] is None else cat(expand(uncond[k], batch), expand(cond[k], batch)) for k in cond}
    raise TypeError("classifier-free guidance needs cond and uncond as tensors or as dicts of tensors "
                    f"(got {type(cond).__name__} and {type(uncond).__name__})")


def concat(first: Any, second: Any) -> Any:
    """The rows of ``first`` then those of ``second`` (no broadcasting; dicts entry by entry)."""
    if torch.is_tensor(first) and torch.is_tensor(second):
        return torch.cat([first, second])
    if isinstance(first, dict) and isinstance(second, dict) and set(first) == set(second):
        return {k: None if second[k] is None else concat(first[k], second[k]) for k in second}
    raise TypeError(f"cannot concatenate a {type(first).__name__} and a {type(second).__name__} condition")


def select(cond: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` (an index tensor) of every entry."""
    if torch.is_tensor(cond):
        return cond.index_select(0, rows)
    if isinstance(cond, dict):
        return {k: None if v is None else select(v, rows) for k, v in cond.items()}
    raise TypeError(f"cannot select rows of a {type(cond).__name__} condition")


def cast(cond: Any, dtype: torch.dtype | None) -> Any:
    """Floating entries cast to ``dtype`` (integer labels and masks are left as they are)."""
    if dtype is None:
        return cond
    if torch.is_tensor(cond):
        return cond.to(dtype) if cond.is_floating_point() and cond.dtype != dtype else cond
    if isinstance(cond, dict):
        return {k: cast(v, dtype) for k, v in cond.items()}
    return cond


def batch_of(cond: Any) -> int | None:
    """The largest batch of the entries (None when there is no tensor)."""
    if torch.is_tensor(cond):
        return cond.shape[0] if cond.dim() else None
    if isinstance(cond, dict):
        sizes = [batch_of(v) for v in cond.values() if v is not None]
        sizes = [s for s in sizes if s is not None]
        return max(sizes) if sizes else None
    return None
