"""StreamPipeline (Stream Batch): order and latency in ticks, equality with offline sampling, queues
(back-pressure, draining), the similarity filter, and residual CFG against a step-by-step reference."""
from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from diffrt.runtime import Denoiser, NoiseSchedule, models
from diffrt.runtime.stream import StreamPipeline, offline_frame

STAGES = (20, 35, 45)


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


def _frames(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 16, 16, generator=gen) * 2 - 1 for _ in range(n)]


def test_frames_come_out_in_order_after_n_minus_1_ticks_equal_to_offline(dit):
    pipe = StreamPipeline(dit, t_index_list=STAGES, cond=torch.tensor(models.NULL_CLASS))
    frames, labels = _frames(6), [torch.tensor(i) for i in range(6)]
    results = [pipe.tick(f, y) for f, y in zip(frames, labels)] + [pipe.tick(bubble=True) for _ in range(2)]
    assert [r.ready for r in results] == [False, False] + [True] * 6  # the first n - 1 ticks are flagged
    assert all(r.image is None for r in results[:2])
    assert [r.frame_id for r in results[2:]] == list(range(6))  # frame k leaves at tick k + n - 1
    for r in results[2:]:
        expected = offline_frame(pipe, frames[r.frame_id], labels[r.frame_id])
        torch.testing.assert_close(r.image, expected, rtol=1e-5, atol=1e-5)
    assert pipe.stats.model_calls == 8 and set(pipe.stats.rows) == {3}  # one batched call of n rows per tick


def test_generation_from_conditions_is_seeded(dit):
    outputs = []
    for _ in range(2):
        pipe = StreamPipeline(dit, t_index_list=STAGES, img2img=False, seed=7)
        outputs.append([pipe.tick(None, torch.tensor(i)).image for i in range(4)][-1])
    assert torch.equal(outputs[0], outputs[1])


def test_queues_decouple_threads_and_close_drains(dit):
    pipe = StreamPipeline(dit, t_index_list=STAGES, cond=torch.tensor(2), queue_size=2).start()
    frames = _frames(7, seed=1)
    producer = threading.Thread(target=lambda: [pipe.submit(f) for f in frames])
    producer.start()
    received = [pipe.get(timeout=30) for _ in range(5)]  # 7 in, 5 out before close: 2 still in flight
    producer.join()
    received += pipe.close(timeout=30)
    assert [r.frame_id for r in received] == list(range(7))
    assert pipe.get(timeout=1) is None  # closed and drained
    for r in received:
        torch.testing.assert_close(r.image, offline_frame(pipe, frames[r.frame_id]), rtol=1e-5, atol=1e-5)


def test_a_full_input_queue_pushes_back(dit):
    slow = Denoiser(lambda x, t, c=None: (time.sleep(0.2), torch.zeros_like(x))[1], dit.schedule, sample_shape=(1, 16, 16))
    pipe = StreamPipeline(slow, t_index_list=STAGES, queue_size=1).start()
    frame = _frames(1)[0]
    with pytest.raises(queue.Full):
        for _ in range(4):
            pipe.submit(frame, timeout=0.01)
    pipe.close(timeout=30)


def test_worker_errors_reach_the_consumer(dit):
    def broken(x, t, c=None):
        raise ValueError("model exploded")

    pipe = StreamPipeline(Denoiser(broken, dit.schedule, sample_shape=(1, 16, 16)), t_index_list=STAGES).start()
    pipe.submit(_frames(1)[0])
    with pytest.raises(RuntimeError, match="worker failed"):
        pipe.get(timeout=10)


def test_similarity_filter_skips_repeats_in_bounded_runs(dit):
    pipe = StreamPipeline(dit, t_index_list=(45,), similarity_threshold=0.98, max_skip_frames=3)
    frame = _frames(1)[0]
    results = [pipe.tick(frame) for _ in range(13)]
    assert [r.skipped for r in results] == [False] + ([True] * 3 + [False]) * 3
    assert pipe.stats.skipped == 9 and pipe.stats.longest_skip_run == 3 and pipe.stats.model_calls == 4
    assert all(torch.equal(r.image, results[0].image) for r in results[:4])
    different = StreamPipeline(dit, t_index_list=(45,), similarity_threshold=0.98)
    assert not any(different.tick(f).skipped for f in _frames(8, seed=3))


class ToyEpsilon:
    """An analytic noise predictor: eps = 0.3 x + 0.1 t/1000 + cond (cond a scalar per row)."""

    def __call__(self, x, t, cond):
        return 0.3 * x + 0.1 * (t / 1000).reshape(-1, 1, 1, 1) + cond.float().reshape(-1, 1, 1, 1)


def _toy(**options):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    den = Denoiser(ToyEpsilon(), schedule, sample_shape=(1, 4, 4))
    return StreamPipeline(den, t_index_list=(10, 30, 45), cond=torch.tensor(0.5), uncond=torch.tensor(-0.2),
                          guidance_scale=2.0, delta=0.8, **options)


def _reference_rcfg(pipe, frames, mode):
    """StreamDiffusion's residual CFG written out row by row and tick by tick."""
    n, g, delta = pipe.stages, pipe.guidance_scale, pipe.delta
    a, b, c_skip, c_out = pipe.a, pipe.b, pipe.c_skip, pipe.c_out
    noise, stock, latents, out = pipe.init_noise, pipe.init_noise.clone(), [None] * (n - 1), []

    def step(m, x, i):  # LCM step of row i for an epsilon model
        return c_out[i] * (x - b[i] * m) / a[i] + c_skip[i] * x

    for frame in frames:
        rows = [a[0] * frame.reshape(1, 1, 4, 4) + b[0] * noise[:1]] + latents
        stock = torch.cat([noise[:1], stock[:-1]])
        if mode == "initialize":
            stock = torch.cat([ToyEpsilon()(rows[0], pipe.timesteps[:1], torch.tensor([-0.2])), stock[1:]])
        new_stock, denoised = [], []
        for i in range(n):
            if rows[i] is None:
                rows[i] = torch.zeros(1, 1, 4, 4)
            cond = ToyEpsilon()(rows[i], pipe.timesteps[i:i + 1], torch.tensor([0.5]))
            uncond = delta * stock[i:i + 1]
            m = uncond + g * (cond - uncond)
            denoised.append(step(m, rows[i], i))
            a_next, b_next = (a[i + 1], b[i + 1]) if i + 1 < n else (1.0, 1.0)
            new_stock.append(noise[(i + 1) % n:(i + 1) % n + 1] + a_next / b_next * step(m, b[i] * stock[i:i + 1], i))
        stock = torch.cat(new_stock)
        latents = [a[i + 1] * denoised[i] + b[i + 1] * noise[i + 1:i + 2] for i in range(n - 1)]
        out.append(denoised[-1])
    return out


@pytest.mark.parametrize("mode", ["self", "initialize"])
def test_residual_cfg_matches_the_step_by_step_reference(mode):
    pipe = _toy(cfg_type=mode)
    frames = _frames(5, seed=4)
    frames = [f[:, :4, :4] for f in frames]
    got = [pipe.tick(f) for f in frames]
    expected = _reference_rcfg(_toy(cfg_type=mode), frames, mode)
    for result, reference in zip(got[2:], expected[2:]):
        torch.testing.assert_close(result.image, reference, rtol=1e-5, atol=1e-5)
    rows = {"self": 3, "initialize": 4}[mode]
    assert set(pipe.stats.rows) == {rows}  # "self": no unconditional call at all; "initialize": one more row


def test_full_cfg_is_explicit_guidance():
    pipe = _toy(cfg_type="full")
    frame = _frames(1, seed=5)[0][:, :4, :4]
    result = [pipe.tick(frame) for _ in range(3)][-1]
    assert set(pipe.stats.rows) == {6}
    plain = _toy(cfg_type="none")
    plain.den = Denoiser(lambda x, t, c: ToyEpsilon()(x, t, torch.full_like(c, -0.2)) + 2.0 * (
        ToyEpsilon()(x, t, c) - ToyEpsilon()(x, t, torch.full_like(c, -0.2))), plain.den.schedule, sample_shape=(1, 4, 4))
    expected = [plain.tick(frame) for _ in range(3)][-1]
    torch.testing.assert_close(result.image, expected.image, rtol=1e-5, atol=1e-6)


def test_bad_configurations_are_refused(dit):
    with pytest.raises(ValueError, match="cfg_type must be one of"):
        StreamPipeline(dit, cfg_type="double")
    with pytest.raises(NotImplementedError, match="predicts v_prediction"):
        StreamPipeline(dit, cfg_type="self", guidance_scale=2.0)
    with pytest.raises(ValueError, match="increasing indices"):
        StreamPipeline(dit, t_index_list=(45, 10))
    with pytest.raises(ValueError, match="needs uncond"):
        StreamPipeline(dit, cfg_type="full", guidance_scale=3.0)
    with pytest.raises(RuntimeError, match="start"):
        StreamPipeline(dit).submit(_frames(1)[0])


@pytest.mark.parametrize("kind", ["AutoencoderTiny", "AutoencoderKL"])
def test_vae_stage_in_the_stream(kind):
    import diffusers
    from diffrt.runtime.stream import vae_codec

    torch.manual_seed(0)
    if kind == "AutoencoderTiny":
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    else:
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    vae = vae.eval()
    encode, decode = vae_codec(vae)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = encode(image)
    assert latent.shape[:2] == (1, 4) and decode(latent).shape == image.shape
    pipe = _toy_latent(encode, decode, latent.shape[1:])
    results = [pipe.tick(image) for _ in range(3)]
    assert results[-1].ready and results[-1].image.shape == image.shape
    torch.testing.assert_close(results[-1].image, offline_frame(pipe, image), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="AutoencoderTiny or AutoencoderKL"):
        vae_codec(torch.nn.Linear(2, 2))


def _toy_latent(encode, decode, latent_shape):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    den = Denoiser(ToyEpsilon(), schedule, sample_shape=tuple(latent_shape))
    return StreamPipeline(den, t_index_list=(30, 45), cond=torch.tensor(0.1), encode=encode, decode=decode,
                          latent_shape=tuple(latent_shape))


def test_graphs_run_eagerly_off_cuda_and_say_so(dit, caplog):
    import logging

    from diffrt.runtime.graphs import GraphRunner, graph_denoiser

    runner = GraphRunner(lambda a, b: a * 2 + b)
    with caplog.at_level(logging.INFO, logger="diffrt.runtime.graphs"):
        assert torch.equal(runner(torch.ones(2), torch.ones(2)), torch.full((2,), 3.0))
    assert "need CUDA tensors" in caplog.text and not runner.timings
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 600.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(graph_denoiser(dit)(x, t, y), dit(x, t, y))
    pipe = StreamPipeline(dit, t_index_list=STAGES, cond=torch.tensor(3), cuda_graphs=True)
    frames = _frames(3, seed=9)
    result = [pipe.tick(f) for f in frames][-1]
    torch.testing.assert_close(result.image, offline_frame(pipe, frames[0]), rtol=1e-5, atol=1e-5)


class SimulatedClock:
    """Time that passes only when the simulated model runs: ms_per_row per batch row."""

    def __init__(self, ms_per_row: float):
        self.now, self.ms_per_row = 0.0, ms_per_row

    def __call__(self) -> float:
        return self.now

    def model(self, x, t, cond=None):
        self.now += self.ms_per_row * x.shape[0] / 1e3
        return ToyEpsilon()(x, t, cond)


def _slow_toy(clock: SimulatedClock, **options):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    den = Denoiser(clock.model, schedule, sample_shape=(1, 4, 4))
    return StreamPipeline(den, t_index_list=(10, 30, 45), cond=torch.tensor(0.5), uncond=torch.tensor(-0.2),
                          guidance_scale=2.0, **options)


def test_deadline_degrades_guidance_instead_of_dropping_frames():
    from diffrt.runtime.deadline import DeadlinePolicy

    clock = SimulatedClock(15)  # 6 rows (full CFG) = 90 ms > 60 ms; 3 rows (residual CFG) = 45 ms
    policy = DeadlinePolicy(budget_ms=60, patience=2, clock=clock)
    pipe = _slow_toy(clock, cfg_type="full", deadline=policy)
    frames = [f[:, :4, :4] for f in _frames(8, seed=6)]
    results = [pipe.tick(f) for f in frames]
    assert policy.rung == "residual-guidance" and pipe.cfg_type == "self"
    assert policy.changes == [(2, "residual-guidance")]
    assert pipe.stats.rows[:2] == [6, 6] and set(pipe.stats.rows[2:]) == {3}
    assert all(r.ready for r in results[2:]) and results[-1].degradation == "residual-guidance"  # no frame dropped


def test_deadline_respects_the_quality_floor_and_recovers():
    from diffrt.runtime.deadline import DeadlinePolicy

    clock = SimulatedClock(15)
    floor = DeadlinePolicy(budget_ms=20, patience=1, allow=("no-guidance",), clock=clock)
    pipe = _slow_toy(clock, cfg_type="full", deadline=floor)
    frames = [f[:, :4, :4] for f in _frames(4, seed=7)]
    for f in frames:
        pipe.tick(f)
    assert floor.rung == "no-guidance" and pipe.cfg_type == "none"  # still over budget: no rung left to take
    fast = SimulatedClock(1)
    relaxed = DeadlinePolicy(budget_ms=60, patience=2, clock=fast)
    pipe = _slow_toy(fast, cfg_type="full", deadline=relaxed)
    relaxed.level, relaxed._original = 1, {"cfg_type": "full", "similarity_threshold": None}
    relaxed._apply(pipe)
    for f in frames:
        pipe.tick(f)
    assert relaxed.level == 0 and pipe.cfg_type == "full" and relaxed.changes == [(2, None)]  # back to full CFG
    with pytest.raises(ValueError, match="allow a subset"):
        DeadlinePolicy(budget_ms=10, allow=("fewer-layers",))


class BlockClock:
    """Time that passes only when transformer blocks run: ms_per_block per block call on the batch."""

    def __init__(self, model, ms_per_block: float):
        self.now, self.ms_per_block = 0.0, ms_per_block
        self.handles = [block.register_forward_hook(self._tick) for block in model.blocks]

    def _tick(self, *_):
        self.now += self.ms_per_block / 1e3

    def __call__(self) -> float:
        return self.now

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_deadline_exits_earlier_on_a_model_with_exit_heads():
    from diffrt.runtime.deadline import DeadlinePolicy

    den = models.load("digits-dit")  # shipped exit heads after blocks 1-5
    clock = BlockClock(den.model, ms_per_block=10)  # one call of 6 blocks a tick: 60 ms > 45 ms
    policy = DeadlinePolicy(budget_ms=45, patience=2, allow=("exit-earlier",), exit_threshold=1.0, recover_below=0.1,
                            clock=clock)  # 10 ms after exiting is not under 4.5 ms: it stays degraded
    try:
        pipe = StreamPipeline(den, t_index_list=STAGES, cond=torch.tensor(3), deadline=policy)
        results = [pipe.tick(f) for f in _frames(6, seed=8)]
    finally:
        clock.remove()
    assert policy.rung == "exit-earlier" and pipe.early_exit == 1.0 and policy.changes == [(2, "exit-earlier")]
    # threshold 1: every row (one per stage) is confident at the first head from tick 3; the first of those
    # ticks has no plan yet (made from the previous calls, no host read) and runs every block, ticks 4-6 run 1 of 6
    assert pipe.exit_stats["exits"] == {1: len(STAGES) * 3, 6: len(STAGES)}
    assert pipe.exit_stats["blocks_saved_fraction"] == pytest.approx(3 * 5 / (4 * 6))
    assert all(r.ready for r in results[len(STAGES) - 1:]) and results[-1].degradation == "exit-earlier"
    graphed = StreamPipeline(den, t_index_list=STAGES, cond=torch.tensor(3), cuda_graphs=True)
    assert not graphed.supports_early_exit  # a graph-captured tick cannot read the exit decision
    with pytest.raises(ValueError, match="exit heads"):
        StreamPipeline(models.load("digits-unet"), t_index_list=STAGES, cond=torch.tensor(3), early_exit=0.2)


class SteppingClock:
    """Every reading is ``ms`` later than the last: each tick takes ``ms``."""

    def __init__(self, ms: float):
        self.now, self.ms = 0.0, ms

    def __call__(self) -> float:
        self.now += self.ms / 1e3
        return self.now


def test_deadline_caches_more_on_a_step_cached_model_and_steps_back():
    from diffrt.runtime import optimize
    from diffrt.runtime.deadline import DeadlinePolicy

    fast = optimize(models.load("digits-dit"), step_cache=0.01)
    clock = SteppingClock(50)
    policy = DeadlinePolicy(budget_ms=10, patience=1, allow=("more-caching", "residual-guidance", "exit-earlier"),
                            cache_threshold=0.5, clock=clock)
    pipe = StreamPipeline(fast, t_index_list=STAGES, cond=torch.tensor(3), deadline=policy)
    for frame in _frames(3, seed=9):
        pipe.tick(frame)
    assert policy.changes == [(1, "more-caching"), (2, "residual-guidance"), (3, "exit-earlier")]
    # residual CFG needs noise predictions (this DiT predicts v) and early exit does not compose with the
    # step cache: both passed over; caching stays raised
    assert fast.step_cache.threshold == 0.5 and pipe.cfg_type == "none" and pipe.early_exit is None
    clock.ms = 1  # fast again: step back rung by rung, the cache threshold restored
    for frame in _frames(3, seed=10):
        pipe.tick(frame)
    assert policy.level == 0 and fast.step_cache.threshold == 0.01
