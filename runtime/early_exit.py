"""Early exit, the runtime's side: the state a sampling run hands to a model with exit heads, and the protocol.

A model supports early exit when it implements :class:`EarlyExitModel`: it has exit heads attached
(``model.exit_heads is not None``) and its forward obeys the call context's ``early_exit`` switch
(:mod:`diffrt.runtime.context`). While that switch holds an :class:`ExitState`, the forward runs
block by block and, at each exit, lets the rows whose exit uncertainty is below ``state.threshold``
leave with that exit's prediction (``state.per_sample``; otherwise the whole batch leaves together at
the first exit where every row is confident), and it records what it ran with :meth:`ExitState.begin`
and :meth:`ExitState.count`. ``state.graphs`` asks it to run the segments between exits as CUDA graphs.

No host sync: the rows a call keeps running after each exit are planned on the host from the counts
of the previous calls (:meth:`ExitState.plan`, fed by :meth:`ExitState.observe` through a non-blocking
:class:`~diffrt.runtime.residency.LaggedRead`); the device decides which rows are confident, their
outputs are fixed there, and the rows the plan keeps are the least confident ones. A row the plan
lets go before it is confident (more of them than the previous call had) leaves with that exit's
prediction. ``synchronous=True`` reads the count at every exit instead (one blocking read per exit):
the plan is then exact.

The Sampler and the StreamPipeline set the switch (:func:`exiting`) and read ``state.stats``; they know
nothing else of the model. The shipped digits DiT (:mod:`diffrt.runtime.models.exits`) implements it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from . import context
from .residency import LaggedRead


@dataclass
class ExitState:
    """The threshold of the sampling in progress, whether rows exit one by one (``per_sample``) or the
    batch together, and the blocks run (counted per row: a row leaving at depth d ran d blocks)."""

    threshold: float
    per_sample: bool = True
    graphs: bool = False  # the segments between exits as CUDA graphs
    synchronous: bool = False  # read the confident rows at every exit (a blocking read each) instead of planning
    memory: dict[int, list[float]] | None = None  # call index -> fractions seen, kept across trajectories (Sampler)
    calls: int = 0
    blocks_run: int = 0
    blocks_full: int = 0
    exits: dict[int, int] = field(default_factory=dict)  # depth -> rows that stopped there
    _reader: LaggedRead | None = field(default=None, repr=False)
    _let_go: torch.Tensor | None = field(default=None, repr=False)  # device count of rows the plan let go unfinished
    _fractions: list[float] | None = field(default=None, repr=False)  # of the rows still running after each exit

    def begin(self, rows: int, blocks: int) -> None:
        """A model call of ``rows`` rows through a model of ``blocks`` blocks starts."""
        self.calls += 1
        self.blocks_full += blocks * rows

    def let_go(self, rows: torch.Tensor) -> None:
        """``rows`` (a device count) left an exit unfinished because the plan kept fewer running."""
        self._let_go = rows if self._let_go is None else self._let_go + rows

    def plan(self, rows: int, exits: int) -> list[int]:
        """How many of a call's ``rows`` rows to keep running after each of its ``exits`` exits, rounded up from
        the fractions seen at the same call of an earlier trajectory (``memory``: a Sampler keeps it), else
        at the newest call of this one whose counts have arrived; every row before anything has."""
        seen = self._reader.latest() if self._reader is not None else None
        if seen is not None:
            *counts, total, call = seen.tolist()
            self._fractions = [n / total for n in counts] if total else None
            if self._fractions is not None and self.memory is not None:
                self.memory[call] = self._fractions
        fractions = self._fractions if self.memory is None else self.memory.get(self.calls, self._fractions)
        if fractions is None or len(fractions) != exits:
            return [rows] * exits
        keep, planned = rows, []
        for fraction in fractions:
            keep = min(keep, math.ceil(fraction * rows - 1e-9))
            planned.append(keep)
        return planned

    def observe(self, unfinished: torch.Tensor, rows: int) -> None:
        """Hand the device's counts of unfinished rows after each exit (int64 [exits]) of this call (``rows``
        rows) to later calls' plans, without waiting for them."""
        counts = torch.cat([unfinished, unfinished.new_full((1,), rows), unfinished.new_full((1,), self.calls - 1)])
        if self._reader is None:
            self._reader = LaggedRead(counts)
        self._reader.request(counts)

    def count(self, depth: int, rows: int) -> None:
        """``rows`` rows left after block ``depth`` (the last block for the rows that ran the whole model)."""
        if rows:
            self.blocks_run += depth * rows
            self.exits[depth] = self.exits.get(depth, 0) + rows

    @property
    def stats(self) -> dict[str, Any]:
        saved = 1 - self.blocks_run / self.blocks_full if self.blocks_full else 0.0
        return {"calls": self.calls, "blocks_run": self.blocks_run, "blocks_full": self.blocks_full,
                "blocks_saved_fraction": saved, "exits": dict(sorted(self.exits.items()))}

    def rows_let_go(self) -> int:
        """Rows the plan let go before they were confident, over every call (a read of a device count: ask after
        sampling)."""
        return 0 if self._let_go is None else int(self._let_go)


@runtime_checkable
class EarlyExitModel(Protocol):
    """A model with exit heads (module docstring). ``exit_heads`` is None while none are attached."""

    exit_heads: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def has_exit_heads(model: Any) -> bool:
    """True when ``model`` implements :class:`EarlyExitModel` and has exit heads attached."""
    return isinstance(model, EarlyExitModel) and model.exit_heads is not None


@contextlib.contextmanager
def exiting(state: ExitState) -> Iterator[ExitState]:
    """Model calls inside the block exit early as ``state`` says (sets the ``early_exit`` switch)."""
    with context.switches(early_exit=state):
        yield state
