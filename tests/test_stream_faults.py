"""StreamPipeline contains faults: a bad frame gets an error result in its slot and the stream goes on;
frames are checked before they enter (never broadcast); a failed tick leaves the pipeline drainable;
every timeout holds (no call blocks forever, even with a dead worker); a closed pipeline restarts.
Every blocking call here has a timeout, and calls that could hang run in a thread joined with one."""
from __future__ import annotations

import queue
import threading

import pytest
import torch
from diffrt.runtime import Denoiser, NoiseSchedule, models
from diffrt.runtime.stream import StreamPipeline, StreamWorkerError, offline_frame

STAGES = (10, 30, 45)
WAIT = 20  # seconds any call in these tests may take before the test calls it a hang


class ToyModel:
    """An analytic noise predictor (eps = 0.3 x + 0.01 x^2 + t/1e4 + cond) that refuses class 99, can be
    told to fail its next calls (``fail_calls``) and can be held at a gate (a stuck device)."""

    def __init__(self):
        self.fail_calls, self.gate = 0, None

    def __call__(self, x, t, cond):
        if self.gate is not None:
            self.gate.wait(WAIT)
        if self.fail_calls:
            self.fail_calls -= 1
            raise RuntimeError("device lost")
        if (cond == 99).any():
            raise ValueError("unknown class 99")
        return 0.3 * x + 0.01 * x * x + (t / 1e4).reshape(-1, 1, 1, 1) + cond.float().reshape(-1, 1, 1, 1)


def _toy(model=None, **options):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    den = Denoiser(model or ToyModel(), schedule, sample_shape=(1, 4, 4))
    return StreamPipeline(den, t_index_list=STAGES, cond=torch.tensor(0.5), **options)


def _frames(n, seed=0, shape=(1, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=gen) * 2 - 1 for _ in range(n)]


def _in_thread(call, timeout=WAIT):
    """Run ``call`` in a thread; fail the test if it has not returned within ``timeout``. Returns
    ('ok', value) or ('raised', exception)."""
    outcome = []

    def run():
        try:
            outcome.append(("ok", call()))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(("raised", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{call} did not return within {timeout} s"
    return outcome[0]


def _drain(pipe):
    return [pipe.tick(bubble=True) for _ in range(pipe.stages - 1)]


def _assert_good(pipe, result, frames):
    assert result.ready and result.error is None and not result.failed
    torch.testing.assert_close(result.image, offline_frame(pipe, frames[result.frame_id]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ frame checks
@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(1, 4, 1), ValueError, r"shape \[1, 4, 4\].*got \[1, 4, 1\]"),
    (torch.rand(16), ValueError, r"shape \[1, 4, 4\].*got \[16\]"),
    (torch.rand(2, 1, 4, 4), ValueError, r"got \[2, 1, 4, 4\]"),
    (torch.ones(1, 4, 4, dtype=torch.int64), ValueError, "floating-point.*int64"),
    (torch.full((1, 4, 4), float("nan")), ValueError, "16 NaN or infinite"),
    ([[0.0] * 4] * 4, TypeError, "torch.Tensor, got list"),
])
def test_bad_frames_are_refused_before_they_enter(bad, error, message):
    pipe = _toy()
    frames = _frames(2)
    assert not pipe.tick(frames[0]).ready
    with pytest.raises(error, match=message):
        pipe.tick(bad)  # never broadcast into the batch
    assert pipe.next_id == 1 and pipe.stats.ticks == 1  # nothing changed
    results = [pipe.tick(frames[1])] + _drain(pipe)
    assert [r.frame_id for r in results] == [None, 0, 1]
    for result in results[1:]:
        _assert_good(pipe, result, frames)
    pipe = _toy().start()
    with pytest.raises(error, match=message):
        pipe.submit(bad, timeout=1)  # refused in the producer: nothing is queued
    assert pipe.submit(frames[0], timeout=WAIT) == 0
    assert [r.frame_id for r in pipe.close(timeout=WAIT)] == [0]


def test_a_batched_frame_of_one_is_taken():
    pipe = _toy()
    frames = _frames(1)
    results = [pipe.tick(frames[0].unsqueeze(0))] + _drain(pipe)
    _assert_good(pipe, results[-1], frames)


# ------------------------------------------------------------------------------------------ error results
@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


def test_a_finite_frame_that_overflows_leaves_as_an_error_result_in_its_slot(dit, caplog):
    pipe = StreamPipeline(dit, t_index_list=(20, 35, 45), cond=torch.tensor(2))
    frames = _frames(5, seed=1, shape=(1, 16, 16))
    frames[2] = torch.full((1, 16, 16), 1e30)  # finite, but the model's output is not
    results = [pipe.tick(f) for f in frames] + _drain(pipe)
    out = [r for r in results if r.frame_id is not None]
    assert [r.frame_id for r in out] == [0, 1, 2, 3, 4]  # in order, none lost
    failed = out[2]
    assert failed.failed and failed.image is None and not failed.ready
    assert "non-finite values" in failed.error and "stage" in failed.error
    for result in out[:2] + out[3:]:
        _assert_good(pipe, result, frames)
        assert torch.isfinite(result.image).all()
    assert "frame 2 failed" in caplog.text


def test_a_frame_whose_tick_raises_gets_an_error_result_and_the_stream_goes_on():
    pipe = _toy()
    frames = _frames(4, seed=2)
    labels = [torch.tensor(1.0), torch.tensor(99), torch.tensor(2.0), None]
    results = [pipe.tick(f, y) for f, y in zip(frames, labels)] + _drain(pipe)
    out = [r for r in results if r.frame_id is not None]
    assert [r.frame_id for r in out] == [0, 1, 2, 3]
    assert out[1].failed and out[1].error == "ValueError: unknown class 99" and out[1].image is None
    for result in (out[0], out[2], out[3]):
        expected = offline_frame(pipe, frames[result.frame_id], labels[result.frame_id])
        torch.testing.assert_close(result.image, expected, rtol=1e-5, atol=1e-5)


def test_after_a_failed_tick_the_pipeline_can_still_be_drained():
    model = ToyModel()
    pipe = _toy(model)
    frames = _frames(4, seed=3)
    pipe.tick(frames[0])
    pipe.tick(frames[1])
    model.fail_calls = 2  # the tick and its retry without the frame: the model itself fails
    with pytest.raises(RuntimeError, match="device lost"):
        pipe.tick(frames[2])
    assert pipe.next_id == 2 and pipe.buffer_ids == [1, 0]  # as before the failed tick
    results = [pipe.tick(frames[2])] + _drain(pipe)  # the same frame again, then drain
    assert [r.frame_id for r in results] == [0, 1, 2]
    for result in results:
        _assert_good(pipe, result, frames)


# ------------------------------------------------------------------------------------------ worker mode
def test_worker_contains_bad_frames_and_loses_none_queued_behind_them():
    model = ToyModel()
    model.gate = threading.Event()  # hold the first tick until every frame is queued
    pipe = _toy(model, queue_size=8, encode=lambda f: f).start()  # with an encode, the first frame fixes the shape
    frames = _frames(6, seed=4)
    conds = [None, torch.tensor(99), None, None, None, None]
    frames[3] = torch.rand(1, 4, 2)  # passes submit (the shape is not known yet), refused in its tick
    assert [pipe.submit(f, c, timeout=WAIT) for f, c in zip(frames, conds)] == list(range(6))
    model.gate.set()
    received = [pipe.get(timeout=WAIT) for _ in range(4)]
    received += _in_thread(lambda: pipe.close(timeout=WAIT))[1]
    assert [r.frame_id for r in received] == list(range(6))  # every frame in its slot
    assert [r.failed for r in received] == [False, True, False, True, False, False]
    assert "unknown class 99" in received[1].error and "got [1, 4, 2]" in received[3].error
    for result in received:
        if not result.failed:
            _assert_good(pipe, result, frames)


def test_a_dead_worker_blocks_neither_producer_nor_close():
    model = ToyModel()
    model.fail_calls = 10**6  # the model fails on its own: the worker must stop
    pipe = _toy(model, queue_size=1).start()
    frames = _frames(6, seed=5)
    outcome = _in_thread(lambda: [pipe.submit(f) for f in frames])  # no timeout: must still return
    assert outcome[0] == "raised" and isinstance(outcome[1], StreamWorkerError)
    kind, error = _in_thread(lambda: pipe.get(timeout=WAIT))
    assert kind == "raised" and isinstance(error, StreamWorkerError) and "worker failed" in str(error)
    assert 0 in error.frame_ids and "device lost" in str(error.__cause__)
    assert _in_thread(lambda: pipe.close(timeout=2)) == ("ok", [])
    with pytest.raises(RuntimeError, match="start"):
        pipe.submit(frames[0], timeout=1)


def test_close_reports_a_failure_get_has_not_raised():
    model = ToyModel()
    model.fail_calls = 10**6
    pipe = _toy(model, queue_size=1).start()
    pipe.submit(_frames(1)[0], timeout=WAIT)
    kind, error = _in_thread(lambda: pipe.close(timeout=WAIT))
    assert kind == "raised" and isinstance(error, StreamWorkerError) and error.frame_ids == [0]
    model.fail_calls = 0  # the device is back: the stream starts again
    pipe.start().submit(_frames(1)[0], timeout=WAIT)
    assert [r.frame_id for r in pipe.close(timeout=WAIT)] == [0]


def test_every_timeout_holds_on_a_stuck_worker_and_nothing_is_lost():
    model = ToyModel()
    model.gate = threading.Event()  # the device hangs until the gate opens
    pipe = _toy(model, queue_size=1).start()
    frames = _frames(3, seed=6)
    assert pipe.submit(frames[0], timeout=WAIT) == 0  # taken by the worker, stuck in the model
    assert _in_thread(lambda: pipe.submit(frames[1], timeout=WAIT)) == ("ok", 1)
    kind, error = _in_thread(lambda: pipe.submit(frames[2], timeout=0.05))
    assert kind == "raised" and isinstance(error, queue.Full)
    kind, error = _in_thread(lambda: pipe.get(timeout=0.05))
    assert kind == "raised" and isinstance(error, queue.Empty)
    kind, error = _in_thread(lambda: pipe.close(timeout=0.2))
    assert kind == "raised" and isinstance(error, TimeoutError)
    with pytest.raises(RuntimeError, match="closing"):
        pipe.submit(frames[2], timeout=1)
    with pytest.raises(RuntimeError, match="close"):
        pipe.start()
    model.gate.set()
    kind, results = _in_thread(lambda: pipe.close(timeout=WAIT))
    assert kind == "ok" and [r.frame_id for r in results] == [0, 1]
    for result in results:
        _assert_good(pipe, result, frames)


def test_a_closed_pipeline_restarts_without_losing_the_second_run():
    pipe = _toy()
    first, second = _frames(2, seed=7), _frames(2, seed=8)
    for frames in (first, second):
        pipe.start()
        assert [pipe.submit(f, timeout=WAIT) for f in frames] == [0, 1]  # a fresh stream: ids from 0
        results = _in_thread(lambda: pipe.close(timeout=WAIT))[1]
        assert [r.frame_id for r in results] == [0, 1]
        for result in results:
            _assert_good(pipe, result, frames)
        assert pipe.get(timeout=1) is None  # closed and drained
    with pytest.raises(RuntimeError, match="already running"):
        pipe.start().start()
    assert pipe.close(timeout=WAIT) == []
