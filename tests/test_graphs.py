"""CUDA graphs (diffrt.runtime.graphs) on a GPU: replays equal eager, one graph per bucket, timings,
two threads on one runner, a captured sampling loop."""
import threading

import pytest
import torch
from diffrt.runtime import Sampler, models
from diffrt.runtime.graphs import GraphRunner, capture_sampling, graph_denoiser

pytestmark = pytest.mark.gpu


def test_replays_equal_eager_per_bucket():
    runner = GraphRunner(lambda x, w: torch.relu(x @ w) + 1)
    w = torch.randn(16, 8, device="cuda")
    for rows in (4, 4, 9, 4):
        x = torch.randn(rows, 16, device="cuda")
        torch.testing.assert_close(runner(x, w), torch.relu(x @ w) + 1)
    assert len(runner.timings) == 2
    assert all(t.warmup_s > 0 and t.capture_s > 0 for t in runner.timings.values())
    assert sum(t.replays for t in runner.timings.values()) == 4


def test_two_threads_cannot_mix_their_buffers():
    runner = GraphRunner(lambda x: x * 3)
    results, errors = {}, []

    def work(seed):
        try:
            for _ in range(50):
                x = torch.full((1024,), float(seed), device="cuda")
                if not torch.equal(runner(x), x * 3):
                    errors.append(seed)
            results[seed] = True
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2


def test_captured_denoiser_and_sampling_loop_equal_eager():
    den = models.load("digits-dit", device="cuda")
    labels = torch.arange(10, device="cuda")
    uncond = torch.full_like(labels, models.NULL_CLASS)
    noise = torch.randn(10, 1, 16, 16, device="cuda")
    sampler = Sampler(den, "dpmpp-2m", 10, guidance_scale=3.0)
    with torch.no_grad():
        eager = sampler.sample(noise, cond=labels, uncond=uncond)
        captured = Sampler(graph_denoiser(den), "dpmpp-2m", 10, guidance_scale=3.0).sample(noise, cond=labels,
                                                                                           uncond=uncond)
        loop = capture_sampling(sampler, noise, labels, uncond)
        replayed = loop(noise, labels, uncond)
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


def test_a_graph_captured_stream_tick_equals_the_eager_tick():
    from diffrt.runtime.stream import StreamPipeline

    den = models.load("digits-dit", device="cuda")
    frames = [torch.rand(1, 16, 16, device="cuda") * 2 - 1 for _ in range(5)]
    outputs = []
    for graphs in (False, True):
        pipe = StreamPipeline(den, t_index_list=(20, 35, 45), cond=torch.tensor(3), cuda_graphs=graphs)
        outputs.append([pipe.tick(f).image for f in frames][2:])
    for eager, replayed in zip(*outputs):
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


def test_adaptive_guidance_replays_power_of_two_buckets():
    den = models.load("digits-dit", device="cuda")
    labels = torch.arange(10, device="cuda")
    uncond = torch.full_like(labels, models.NULL_CLASS)
    noise = torch.randn(10, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager = Sampler(den, "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97)
        expected = eager.sample(noise, cond=labels, uncond=uncond)
        graphed = graph_denoiser(den, pad_batches=True)
        sampler = Sampler(graphed, "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97)
        got = sampler.sample(noise, cond=labels, uncond=uncond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    sizes = {10 + n for n in sampler.stats["guided_per_step"]}  # 10 conditional + the guided rows
    assert len(sizes) > 2  # the batch changed size several times ...
    assert len(graphed.runner.timings) <= 2  # ... yet 10..20 rows replay two buckets: 16 and 32
