"""Property-based tests (hypothesis) of StreamPipeline: whatever frames arrive (any shape, dtype, NaN / inf /
huge values, non-tensors, odd conditions), through tick() or through the worker (submit / get / close), each
ends in a documented exception (the frame refused before it enters) or a result in its slot (a finite image or
``.error``), never a hang, and a good frame afterwards still comes out right. Every blocking call has a
timeout; the worker scenario runs in a thread joined with one. ``DIFFRT_FUZZ_LONG=1`` runs the ``fuzz_long``
variants with many more examples (README, Tests)."""
from __future__ import annotations

import math
import queue
import threading

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffrt.runtime import Denoiser, NoiseSchedule  # noqa: E402
from diffrt.runtime.stream import StreamPipeline, StreamWorkerError, offline_frame  # noqa: E402

REFUSED = (ValueError, TypeError)  # what check_frame raises for a frame it cannot take
CI = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow], derandomize=True)
LONG = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
WAIT = 20  # seconds any call may take before the test calls it a hang
FRAME = (1, 4, 4)
STAGES = (10, 30, 45)


class ToyModel:
    """An analytic, row-wise noise predictor (eps = 0.3 x + 0.01 x^2 + t/1e4 + cond) that refuses class 99
    and can be told to fail its next calls (``fail_calls``: the device itself failing)."""

    def __init__(self):
        self.fail_calls = 0

    def __call__(self, x, t, cond):
        if self.fail_calls:
            self.fail_calls -= 1
            raise RuntimeError("device lost")
        if (cond == 99).any():
            raise ValueError("unknown class 99")
        return 0.3 * x + 0.01 * x * x + (t / 1e4).reshape(-1, 1, 1, 1) + cond.float().reshape(-1, 1, 1, 1)


def _pipe(model: ToyModel, fixed_shape: bool, similarity: float | None, queue_size: int = 8) -> StreamPipeline:
    """A 3-stage stream over the toy model; without ``fixed_shape`` the first frame that ticks fixes it."""
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    den = Denoiser(model, schedule, sample_shape=FRAME)
    encode = None if fixed_shape else (lambda f: f)
    return StreamPipeline(den, t_index_list=STAGES, cond=torch.tensor(0.5), encode=encode,
                          similarity_threshold=similarity, queue_size=queue_size)


# ------------------------------------------------------------------------------------------ strategies
SHAPES = st.one_of(st.just(FRAME), st.just((1, *FRAME)), st.lists(st.integers(0, 5), max_size=5).map(tuple))
DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16,
                          torch.int64, torch.bool, torch.complex64])
POKES = st.one_of(st.none(), st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -3e38, 1e300, 1e-45]),
                  st.floats(allow_nan=True, allow_infinity=True))
NON_TENSORS = st.sampled_from([None, [[0.0] * 4] * 4, "frame", 3, 2.5, object()])
CONDS = st.one_of(st.none(), st.none(), st.sampled_from([99, 1.5, math.nan, "label", [1.0, 2.0], torch.zeros(2, 3)]))


@st.composite
def tensor_frames(draw) -> torch.Tensor:
    """A tensor of a drawn shape and dtype, random in [-1, 1], with one element maybe set to a drawn value."""
    shape, dtype, poke = draw(SHAPES), draw(DTYPES), draw(POKES)
    seed = draw(st.integers(0, 2**16))
    frame = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    if poke is not None and frame.numel():
        frame.view(-1)[draw(st.integers(0, frame.numel() - 1))] = poke
    return frame.to(dtype)


FRAMES = st.one_of(tensor_frames(), tensor_frames(), NON_TENSORS)
INPUTS = st.lists(st.tuples(FRAMES, CONDS), min_size=1, max_size=6)


def _good_frame(seed: int = 12345) -> torch.Tensor:
    return torch.rand(FRAME, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ checks
def _check_result(result) -> None:
    """A frame's result: a finite image (ready), or an error and no image."""
    if result.error is not None:
        assert isinstance(result.error, str) and result.error and result.image is None and not result.ready
    else:
        assert result.ready and result.image is not None and torch.isfinite(result.image).all()


def _check_outputs(results: list, accepted: int) -> None:
    """Every accepted frame came out exactly once, in order, each a good image or an error."""
    out = [r for r in results if r.frame_id is not None]
    assert [r.frame_id for r in out] == list(range(accepted))
    for result in out:
        _check_result(result)


def _check_good_frame(pipe: StreamPipeline, result, frame: torch.Tensor) -> None:
    """The good frame submitted last came out right (the similarity filter may hand back the last output)."""
    _check_result(result)
    assert result.error is None, f"a good frame failed after the fuzzed ones: {result.error}"
    if not result.skipped:
        torch.testing.assert_close(result.image, offline_frame(pipe, frame), rtol=1e-5, atol=1e-5)


def _in_thread(call, timeout: float = WAIT):
    """Run ``call`` in a thread joined with ``timeout``; fail if it is still running. Returns its value or
    re-raises what it raised."""
    outcome: list = []

    def run():
        try:
            outcome.append(("ok", call()))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(("raised", error))

    thread = threading.Thread(target=run, name="fuzz-stream-scenario", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the scenario did not finish within {timeout} s (a hang)"
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


# ------------------------------------------------------------------------------------------ tick()
def _tick_scenario(inputs, fixed_shape: bool, similarity: float | None, device_failure: int | None) -> None:
    """Each input ticks (refused before it enters, or a result); a device failure raises and rolls back."""
    model = ToyModel()
    pipe = _pipe(model, fixed_shape, similarity)
    results, accepted = [], 0
    for index, (frame, cond) in enumerate(inputs):
        if index == device_failure:
            _device_fails_once(pipe, model)
        if _refused_by_tick(pipe, frame, cond):
            continue
        results.append(pipe.tick(frame, cond))  # a frame the pipeline takes: a result, whatever happens to it
        accepted += 1
    good = _good_frame()
    if pipe.frame_shape is None or pipe.frame_shape == FRAME:  # the good frame fits (shape not fixed otherwise)
        results.append(pipe.tick(good))
        accepted += 1
    results += [pipe.tick(bubble=True) for _ in range(pipe.stages - 1)]
    _check_outputs(results, accepted)
    if results[-1].frame_id == accepted - 1 and pipe.frame_shape == FRAME and accepted:
        _check_good_frame(pipe, results[-1], good)


def _refused_by_tick(pipe: StreamPipeline, frame, cond) -> bool:
    """Whether check_frame refuses ``frame``; if so, tick() must raise the same, the pipeline unchanged."""
    try:
        pipe.check_frame(frame)
    except REFUSED as error:
        before = (pipe.next_id, pipe.stats.ticks)
        with pytest.raises(type(error)):
            pipe.tick(frame, cond)
        assert (pipe.next_id, pipe.stats.ticks) == before  # refused before anything changed
        return True
    return False


def _device_fails_once(pipe: StreamPipeline, model: ToyModel) -> None:
    """The model fails on its own for one tick (and its retry): tick() raises, the pipeline as it was."""
    before = (pipe.next_id, list(pipe.buffer_ids))
    model.fail_calls = 2
    with pytest.raises(RuntimeError, match="device lost"):
        pipe.tick(_good_frame(7) if pipe.frame_shape in (None, FRAME) else None)
    model.fail_calls = 0
    assert (pipe.next_id, list(pipe.buffer_ids)) == before


tick_args = dict(inputs=INPUTS, fixed_shape=st.booleans(), similarity=st.sampled_from([None, None, 0.5]),
                 device_failure=st.one_of(st.none(), st.integers(0, 5)))


@CI
@given(**tick_args)
def test_fuzzed_frames_through_tick(inputs, fixed_shape, similarity, device_failure):
    _tick_scenario(inputs, fixed_shape, similarity, device_failure)


@pytest.mark.fuzz_long
@LONG
@given(**tick_args)
def test_fuzzed_frames_through_tick_long(inputs, fixed_shape, similarity, device_failure):
    _tick_scenario(inputs, fixed_shape, similarity, device_failure)


# ------------------------------------------------------------------------------------------ the worker
def _worker_scenario(inputs, polls, fixed_shape: bool, similarity: float | None, queue_size: int) -> None:
    """submit (refused in the producer, or an id) with optional get() polls, a good frame, then close():
    every accepted frame comes out once, in order, and the worker thread has stopped."""
    pipe = _pipe(ToyModel(), fixed_shape, similarity, queue_size).start()
    worker = pipe._worker  # the thread close() must stop
    results, ids = [], []
    for (frame, cond), poll in zip(inputs, polls):
        try:
            ids.append(pipe.submit(frame, cond, timeout=WAIT))
        except REFUSED:
            pass
        if poll:
            results += _poll(pipe)
    good = _good_frame()
    good_id = pipe.submit(good, timeout=WAIT) if fixed_shape else None  # unfixed: an earlier frame may fix another
    results += pipe.close(timeout=WAIT)
    worker.join(WAIT)
    assert not worker.is_alive(), "the stream worker did not stop after close()"
    assert pipe.get(timeout=1) is None  # closed and drained
    accepted = len(ids) + (good_id is not None)
    assert ids + ([good_id] if good_id is not None else []) == list(range(accepted))
    _check_outputs(results, accepted)
    if good_id is not None:
        _check_good_frame(pipe, results[-1], good)


def _poll(pipe: StreamPipeline) -> list:
    """A result if one is ready within a short timeout (queue.Empty otherwise: documented, not a failure)."""
    try:
        result = pipe.get(timeout=0.01)
    except queue.Empty:
        return []
    assert result is not None  # the stream is not closed yet
    return [result]


worker_args = dict(inputs=INPUTS, polls=st.lists(st.booleans(), min_size=6, max_size=6), fixed_shape=st.booleans(),
                   similarity=st.sampled_from([None, None, 0.5]), queue_size=st.sampled_from([1, 2, 8]))


@CI
@given(**worker_args)
def test_fuzzed_frames_through_the_worker(inputs, polls, fixed_shape, similarity, queue_size):
    try:
        _in_thread(lambda: _worker_scenario(inputs, polls, fixed_shape, similarity, queue_size))
    except StreamWorkerError as error:  # the toy model never fails on its own here: this is a bug
        pytest.fail(f"the worker stopped on a frame fault: {error}")


@pytest.mark.fuzz_long
@LONG
@given(**worker_args)
def test_fuzzed_frames_through_the_worker_long(inputs, polls, fixed_shape, similarity, queue_size):
    _in_thread(lambda: _worker_scenario(inputs, polls, fixed_shape, similarity, queue_size))
