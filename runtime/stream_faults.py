"""Fault containment of a StreamPipeline: frames checked before they enter, ticks undone when they raise,
non-finite rows reset and their frames marked failed.

* :meth:`StreamFaults.check_frame`: a frame is a floating-point tensor of the pipeline's ``frame_shape``
  (optionally with a leading batch dim of 1) holding finite values; anything else is refused with a
  TypeError / ValueError that names what was expected and what was given (never broadcast). The values
  of a frame already on the GPU are not read (that would wait for the device): a non-finite one fails in
  its tick and leaves as an error result.
* :meth:`StreamFaults._rollback`: a tick that raises leaves the pipeline's host state (stages, frame ids,
  similarity filter, generators, stats) as it was before, so the frames in flight can still be drained.
* :meth:`StreamFaults._contain_nonfinite`: after each tick, a row whose latent, image or residual noise
  is not finite (a finite frame of 1e30 overflows) is reset to an empty stage on the device and its frame
  recorded in ``failures``; it leaves in its slot as an error result instead of a NaN image. The check
  reaches the host through a non-blocking read (:class:`~diffrt.runtime.residency.LaggedRead`): at once on
  CPU; on a GPU when it has arrived, so a frame can leave before its failure is known there (logged).

The pipeline provides ``frame_shape``, ``latent_shape``, ``img2img``, ``device``, ``stages``,
``init_noise``, ``failures``, ``_finite_checks`` (a deque) and the state that ``_STATE`` names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch

from .residency import LaggedRead, is_device_resident

log = logging.getLogger("diffrt.runtime.stream")

# the host state one tick changes (tensors are replaced, never written in place, so references suffice)
_STATE = ("next_id", "previous_frame", "previous_output", "skip_run", "_last_entry", "buffer", "stock_noise",
          "buffer_ids", "buffer_conds", "frame_shape")


def _finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """[rows] bool: whether each row of ``tensor`` holds only finite values."""
    return torch.isfinite(tensor).flatten(1).all(1)


class StreamFaults:
    """Frame checks, tick rollback and non-finite containment for the StreamPipeline (a mixin)."""

    def check_frame(self, frame: Any) -> torch.Tensor | None:
        """``frame`` if this pipeline can take it (None: a frame generated from noise), else TypeError /
        ValueError. :meth:`tick` and :meth:`submit` call it before anything changes."""
        if frame is None:
            return None
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"a frame must be a torch.Tensor, got {type(frame).__name__}")
        if not frame.is_floating_point():
            raise ValueError(f"a frame must hold floating-point values, got dtype {frame.dtype}")
        expected = self.frame_shape
        unbatched = self._unbatched_shape(frame)
        if (expected is not None and unbatched != expected) or len(unbatched) != len(expected or self.latent_shape):
            wanted = list(expected) if expected is not None else f"{len(self.latent_shape)} dims"
            raise ValueError(f"a frame must have shape {wanted} (or with a leading batch dim of 1), got "
                             f"{list(frame.shape)}")
        if not is_device_resident(frame) and not bool(torch.isfinite(frame).all()):
            bad = int((~torch.isfinite(frame)).sum())
            raise ValueError(f"a frame must hold finite values; this one holds {bad} NaN or infinite values")
        return frame  # a frame on the GPU is not read here: a non-finite one fails in its tick (its slot's error)

    def _unbatched_shape(self, frame: torch.Tensor) -> tuple[int, ...]:
        """The frame's shape without a leading batch dim of 1 (when it has one dim more than a frame)."""
        shape = tuple(frame.shape)
        dims = len(self.frame_shape or self.latent_shape)
        return shape[1:] if len(shape) == dims + 1 and shape[0] == 1 else shape

    def _blank_entry(self) -> torch.Tensor:
        """What enters stage 0 in place of a failed frame: zeros shaped like an entry."""
        if self._last_entry is not None:
            return torch.zeros_like(self._last_entry)
        shape = (self.frame_shape or self.latent_shape) if self.img2img else self.latent_shape
        return torch.zeros(1, *shape, device=self.device)

    @contextlib.contextmanager
    def _rollback(self):
        """Undo the host state a tick changed if it raises: the pipeline stays as it was."""
        saved = {name: getattr(self, name) for name in _STATE}
        failures, rows = dict(self.failures), len(self.stats.rows)
        stats = {f.name: getattr(self.stats, f.name) for f in dataclasses.fields(self.stats) if f.name != "rows"}
        generators = {id(g): (g, g.get_state()) for g in (self.generator, self.entry_generator, self.skip_generator)}
        try:
            yield
        except BaseException:
            for name, value in saved.items():
                setattr(self, name, value)
            self.failures = failures
            for name, value in stats.items():
                setattr(self.stats, name, value)
            del self.stats.rows[rows:]
            for generator, state in generators.values():
                generator.set_state(state)
            raise

    def _contain_nonfinite(self, ids: list[int | None], image: torch.Tensor, buffer: torch.Tensor,
                           stock: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer, stock) with every non-finite row reset to an empty stage on the device; the frames of the
        rows found so far recorded as failed (module docstring)."""
        n = self.stages
        row_ok = torch.cat([_finite_rows(buffer), _finite_rows(image).all().reshape(1)]) & _finite_rows(stock)
        keep = row_ok.view(-1, *([1] * (stock.dim() - 1)))
        if n > 1:
            buffer = torch.where(keep[:-1], buffer, 0.0)
        stock = torch.where(keep, stock, torch.roll(self.init_noise, -1, 0))  # a row's residual noise starts anew
        checks = self._finite_checks
        reader = LaggedRead(row_ok)
        reader.request(row_ok)
        checks.append((ids, reader))
        while checks and (found := checks[0][1].latest()) is not None:
            checked_ids, _ = checks.popleft()
            self._record_nonfinite(checked_ids, found.tolist(), set(ids))
        return buffer, stock

    def _record_nonfinite(self, ids: list[int | None], row_ok: list[bool], in_flight: set) -> None:
        n = self.stages
        for row, ok in enumerate(row_ok):
            frame_id = ids[row]
            if ok or frame_id is None or frame_id in self.failures:
                continue
            where = "image" if row == n - 1 else "latent"
            reason = f"non-finite values (NaN or inf) in its {where} at denoising stage {row + 1} of {n}"
            if frame_id in in_flight:
                self.failures[frame_id] = reason
                log.warning("stream: frame %d failed: %s", frame_id, reason)
            else:
                log.error("stream: frame %d had left when its check arrived: %s", frame_id, reason)
