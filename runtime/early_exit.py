"""Early exit, the runtime's side: the state a sampling run hands to a model with exit heads, and the protocol.

A model supports early exit when it implements :class:`EarlyExitModel`: it has exit heads attached
(``model.exit_heads is not None``) and its forward obeys the call context's ``early_exit`` switch
(:mod:`diffrt.runtime.context`). While that switch holds an :class:`ExitState`, the forward runs
block by block and, at each exit, lets the rows whose exit uncertainty is below ``state.threshold``
leave with that exit's prediction (``state.per_sample``; otherwise the whole batch leaves together at
the first exit where every row is confident), and it records what it ran with :meth:`ExitState.begin`
and :meth:`ExitState.count`. ``state.graphs`` asks it to run the segments between exits as CUDA graphs.

The Sampler and the StreamPipeline set the switch (:func:`exiting`) and read ``state.stats``; they know
nothing else of the model. The shipped digits DiT (:mod:`diffrt.runtime.models.exits`) implements it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, runtime_checkable

from . import context


@dataclass
class ExitState:
    """The threshold of the sampling in progress, whether rows exit one by one (``per_sample``) or the
    batch together, and the blocks run (counted per row: a row leaving at depth d ran d blocks)."""

    threshold: float
    per_sample: bool = True
    graphs: bool = False  # the segments between exits as CUDA graphs
    calls: int = 0
    blocks_run: int = 0
    blocks_full: int = 0
    exits: dict[int, int] = field(default_factory=dict)  # depth -> rows that stopped there

    def begin(self, rows: int, blocks: int) -> None:
        """A model call of ``rows`` rows through a model of ``blocks`` blocks starts."""
        self.calls += 1
        self.blocks_full += blocks * rows

    def count(self, depth: int, rows: int) -> None:
        """``rows`` rows left after block ``depth`` (the last block for the rows that ran the whole model)."""
        self.blocks_run += depth * rows
        self.exits[depth] = self.exits.get(depth, 0) + rows

    @property
    def stats(self) -> dict[str, Any]:
        saved = 1 - self.blocks_run / self.blocks_full if self.blocks_full else 0.0
        return {"calls": self.calls, "blocks_run": self.blocks_run, "blocks_full": self.blocks_full,
                "blocks_saved_fraction": saved, "exits": dict(sorted(self.exits.items()))}


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
