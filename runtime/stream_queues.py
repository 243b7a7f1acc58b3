"""The worker thread of a StreamPipeline: :meth:`~StreamQueues.submit`, :meth:`~StreamQueues.get` and
:meth:`~StreamQueues.close`, with timeouts that hold and faults that stay with their frame.

* A frame is checked when it is submitted (the pipeline's ``check_frame``: a wrong shape, dtype or a
  non-finite value raises in the producer, nothing is queued) and gets a frame id, returned by submit().
* In the worker, a frame that fails anyway (its tick raises, its latents go non-finite) gets an error
  result in its slot (``result.error`` says why, ``result.frame_id`` which frame) and the stream goes on.
* Only when the model fails even without the frame it blamed does the worker stop: get() then raises
  :class:`StreamWorkerError`, whose ``frame_ids`` are the frames in flight and queued that did not come
  out; submit() refuses frames from then on instead of waiting for room that never comes.
* Every call with a ``timeout`` returns within it: submit() raises queue.Full, get() queue.Empty,
  close() TimeoutError (the results it collected are kept for the next close() or get()).
* After close() the pipeline can be started again: a restart empties the stages (frame ids from 0).

The pipeline provides ``check_frame(frame)``, ``_tick_queued(frame, cond, frame_id)`` (never raises for a
bad frame), ``tick(bubble=True)``, ``reset()``, ``next_id``, ``buffer_ids`` and ``stages``.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any

log = logging.getLogger("diffrt.runtime.stream")

_CLOSE = object()  # the producer side's end: drain the stages and stop
_END = object()  # the consumer side's end: nothing follows


class StreamWorkerError(RuntimeError):
    """The stream worker stopped because the model fails on its own; ``frame_ids`` did not come out and
    ``results`` holds what close() collected before the end (empty from get())."""

    def __init__(self, message: str, frame_ids: list[int], results: list | None = None):
        super().__init__(message)
        self.frame_ids, self.results = frame_ids, results or []


def _deadline(timeout: float | None) -> float | None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class StreamQueues:
    """The queues and the worker thread of :class:`~diffrt.runtime.stream.StreamPipeline` (a mixin)."""

    def _init_queues(self, queue_size: int) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1 (frames waiting at most), got {queue_size!r}")
        self.queue_size = queue_size  # frames waiting in the input queue at most
        self._state = threading.Condition()  # guards the fields below; notified when they or the queue change
        self._inputs: queue.Queue = queue.Queue()  # bounded by submit(), so close() never blocks on it
        self._outputs: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # results a timed-out close() took
        self._worker: threading.Thread | None = None
        self._closing = self._started = self._failure_raised = False
        self._failure: tuple[str, list[int], BaseException] | None = None
        self._submitted = 0  # the next frame id submit() hands out

    # ------------------------------------------------------------------------------- producer side
    def start(self):
        """Run ticks on a worker thread: :meth:`submit` frames, :meth:`get` results, :meth:`close` at the end.
        Starting again after close() begins a fresh stream (empty stages, frame ids from 0)."""
        with self._state:
            if self._worker is not None:
                raise RuntimeError("the stream is already running" if self._failure is None and not self._closing
                                   else "the stream has not finished closing: close() it before start()")
            if self._started:
                self.reset()
            self._inputs, self._outputs, self._held = queue.Queue(), queue.Queue(), collections.deque()
            self._closing = self._failure_raised = False
            self._failure, self._started, self._submitted = None, True, self.next_id
            self._worker = threading.Thread(target=self._run, args=(self._inputs, self._outputs),
                                            name="diffrt-stream", daemon=True)
            self._worker.start()
        return self

    def submit(self, frame: Any, cond: Any = None, timeout: float | None = None) -> int:
        """Queue a frame and return its frame id. Blocks while the input queue is full (``timeout``: raise
        queue.Full after it); a frame the pipeline cannot take raises ValueError / TypeError here, and a
        stream that is closing or whose worker failed raises RuntimeError (also while waiting for room)."""
        self._check_accepting()
        frame = self.check_frame(frame)
        deadline = _deadline(timeout)
        with self._state:
            while True:
                self._check_accepting()
                if self._inputs.qsize() < self.queue_size:
                    frame_id, self._submitted = self._submitted, self._submitted + 1
                    self._inputs.put((frame, cond, frame_id))
                    return frame_id
                remaining = _remaining(deadline)
                if remaining == 0.0:
                    raise queue.Full(f"the stream's input queue ({self.queue_size} frames) stayed full for {timeout} s")
                self._state.wait(remaining)

    def _check_accepting(self) -> None:
        if self._worker is None:
            raise RuntimeError("start() the stream before submit()")
        if self._failure is not None:
            self._raise_failure()
        if self._closing:
            raise RuntimeError("the stream is closing: it takes no more frames (start() it again after close())")

    # ------------------------------------------------------------------------------- the worker
    def _run(self, inputs: queue.Queue, outputs: queue.Queue) -> None:
        frame_id = None
        try:
            while (item := self._next_input(inputs)) is not _CLOSE:
                frame, cond, frame_id = item
                self._emit(outputs, self._tick_queued(frame, cond, frame_id))
                frame_id = None
            for _ in range(self.stages - 1):  # drain the frames in flight
                self._emit(outputs, self.tick(bubble=True))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, never lost in the thread
            self._fail(error, frame_id, inputs)
        finally:
            outputs.put(_END)
            with self._state:
                self._state.notify_all()

    def _next_input(self, inputs: queue.Queue) -> Any:
        item = inputs.get()
        with self._state:
            self._state.notify_all()  # room for a waiting submit()
        return item

    @staticmethod
    def _emit(outputs: queue.Queue, result) -> None:
        if result.ready or result.error is not None:
            outputs.put(result)

    def _fail(self, error: BaseException, frame_id: int | None, inputs: queue.Queue) -> None:
        """The model fails on its own: stop, and name every frame in flight or queued that will not come out."""
        with self._state:
            lost = [] if frame_id is None else [frame_id]
            lost += [i for i in self.buffer_ids if i is not None]
            while True:
                try:
                    item = inputs.get_nowait()
                except queue.Empty:
                    break
                if item is not _CLOSE:
                    lost.append(item[2])
            message = (f"the stream worker failed ({type(error).__name__}: {error}); frames {sorted(lost)} "
                       "did not come out")
            self._failure = (message, sorted(lost), error)
            self._state.notify_all()
        log.error("%s", message, exc_info=error)

    def _raise_failure(self, results: list | None = None) -> None:
        message, frame_ids, cause = self._failure
        self._failure_raised = True
        raise StreamWorkerError(message, frame_ids, results) from cause

    # ------------------------------------------------------------------------------- consumer side
    def get(self, timeout: float | None = None):
        """The next result (in frame order; a similarity-filter skip comes at once), or None once the stream
        is closed and drained. ``timeout``: raise queue.Empty after it. A failed worker raises
        :class:`StreamWorkerError` after the results it produced."""
        if self._held:
            return self._held.popleft()
        if not self._started:
            raise RuntimeError("start() the stream before get()")
        _deadline(timeout)
        try:
            item = self._outputs.get(timeout=timeout)
        except queue.Empty:
            raise queue.Empty(f"no stream result within {timeout} s") from None
        if item is _END:
            self._outputs.put(_END)  # later get()s see the end too
            if self._failure is not None:
                self._raise_failure()
            return None
        return item

    def close(self, timeout: float | None = None) -> list:
        """Stop taking frames and finish the ones in flight and queued; returns the results not yet taken
        with get(). ``timeout`` bounds the whole call: TimeoutError after it (the results collected so far
        are kept: close() again to keep waiting). Raises :class:`StreamWorkerError` (with ``results``) if
        the worker failed and get() has not said so yet."""
        deadline = _deadline(timeout)
        with self._state:
            worker = self._worker
            if worker is None:
                return self._take_held()
            if not self._closing:
                self._closing = True
                self._inputs.put(_CLOSE)  # the input queue is unbounded: this never blocks
                self._state.notify_all()  # producers waiting for room stop with an error
        results = self._take_held()
        self._collect(results, deadline, timeout)
        worker.join(_remaining(deadline))
        if worker.is_alive():
            self._held.extend(results)
            raise TimeoutError(f"close(): the stream worker did not stop within {timeout} s")
        with self._state:
            self._worker = None
        if self._failure is not None and not self._failure_raised:
            self._raise_failure(results)
        return results

    def _collect(self, results: list, deadline: float | None, timeout: float | None) -> None:
        """Append the worker's results to ``results`` up to its end marker (on a timeout they are held)."""
        while True:
            try:
                item = self._outputs.get(timeout=_remaining(deadline))
            except queue.Empty:
                self._held.extend(results)
                raise TimeoutError(f"close(): the stream did not drain within {timeout} s ({len(self._held)} "
                                   "results kept for the next close() or get())") from None
            if item is _END:
                self._outputs.put(_END)
                return
            results.append(item)

    def _take_held(self) -> list:
        held, self._held = list(self._held), collections.deque()
        return held
