"""Dynamic batching for ``diffrt serve``: concurrent compatible requests share one model batch.

``submit(request)`` returns a ``concurrent.futures.Future``. Requests queue per
:meth:`Engine.key <diffrt.serve.engine.Engine.key>`; one worker thread takes the group whose first
request has waited longest and runs it once it holds ``max_batch`` requests or that request has
waited ``max_wait_ms`` (so a lone request waits at most that long). The queue is bounded: when it
holds ``max_queue`` requests, ``submit`` raises :class:`~diffrt.serve.engine.Unavailable` (the
server answers 503 with Retry-After) instead of growing. A CUDA out-of-memory error fails that
batch's requests with Unavailable, frees the allocator's cache and halves ``max_batch`` (logged), so
the server keeps serving smaller batches. A cancelled future (the server cancels it when the client
disconnects) leaves the queue at once: it never reaches a batch and frees its place in the queue.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .engine import Engine, Unavailable
from .schema import GenerateRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)  # an item is itself: the queue finds and removes it by identity
class _Item:
    request: GenerateRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """The queue and the worker thread (module docstring). ``on_batch(size, seconds)`` observes batches."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 retry_after_s: float = 1.0, on_batch: Callable[[int, float], Any] | None = None):
        self.engine, self.max_batch, self.max_wait_s = engine, max_batch, max_wait_ms / 1e3
        self.max_queue, self.retry_after_s, self.on_batch = max_queue, retry_after_s, on_batch
        self._groups: OrderedDict[tuple, list[_Item]] = OrderedDict()
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="diffrt-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return self._count

    def submit(self, request: GenerateRequest) -> concurrent.futures.Future:
        item = _Item(request)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down", self.retry_after_s)
            if self._count >= self.max_queue:
                raise Unavailable(f"the queue is full ({self.max_queue} requests waiting)", self.retry_after_s)
            self._groups.setdefault(self.engine.key(request), []).append(item)
            self._count += 1
            self._cond.notify()
        item.future.add_done_callback(lambda future: self._forget(item) if future.cancelled() else None)
        return item.future

    def _forget(self, item: _Item) -> None:
        """Drop a cancelled request from the queue (nothing to do when it has left for a batch already)."""
        with self._cond:
            key = self.engine.key(item.request)
            items = self._groups.get(key, [])
            if item not in items:
                return
            items.remove(item)
            if not items:
                del self._groups[key]
            self._count -= 1
            self._cond.notify()
        log.debug("serve: a cancelled request left the queue (%d waiting)", self._count)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests; the queued ones still run; join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                if not self._groups:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                key, items = min(self._groups.items(), key=lambda kv: kv[1][0].queued_at)
                waited = time.monotonic() - items[0].queued_at
                if len(items) >= self.max_batch or waited >= self.max_wait_s or self._closed:
                    batch, rest = items[:self.max_batch], items[self.max_batch:]
                    if rest:
                        self._groups[key] = rest
                    else:
                        del self._groups[key]
                    self._count -= len(batch)
                    return batch
                self._cond.wait(self.max_wait_s - waited)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = self.engine.run([item.request for item in live])
            except torch.cuda.OutOfMemoryError as error:
                self._out_of_memory(live, error)
                continue
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error; the worker goes on
                log.exception("serve: a batch of %d failed", len(live))
                for item in live:
                    item.future.set_exception(error)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - start)
            for item, result in zip(live, results):
                item.future.set_result(result)

    def _out_of_memory(self, batch: list[_Item], error: Exception) -> None:
        smaller = max(1, len(batch) // 2)
        log.error("serve: CUDA out of memory in a batch of %d (%s); cache freed, max_batch %d -> %d", len(batch),
                  error, self.max_batch, min(self.max_batch, smaller))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_batch = min(self.max_batch, smaller)
        for item in batch:
            item.future.set_exception(Unavailable(f"out of GPU memory in a batch of {len(batch)}; retry (the server "
                                                  f"now batches at most {self.max_batch})", self.retry_after_s))
