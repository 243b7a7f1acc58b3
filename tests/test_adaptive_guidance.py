"""Adaptive guidance in the Sampler: the cosine criterion, compaction preserving each trajectory,
equality with plain CFG when nothing drops, and the evaluations it reports."""
from __future__ import annotations

import pytest
import torch
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler, models

SCHEDULE = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                      "prediction_type": "epsilon"})


class Directions:
    """A toy model: prediction = base + cond * bend (cond 0 = unconditional); cos(cond, uncond) is set by
    the size of each sample's cond, the same at every step."""

    def __init__(self, shape=(1, 4, 4)):
        gen = torch.Generator().manual_seed(0)
        self.base = torch.randn(shape, generator=gen)
        bend = torch.randn(shape, generator=gen)
        self.bend = bend - (bend * self.base).sum() / self.base.square().sum() * self.base  # orthogonal to base

    def __call__(self, x, t, cond):
        return 0.1 * x + self.base + cond.float().reshape(-1, 1, 1, 1) * self.bend

    def cosine(self, c: float) -> float:
        cond, uncond = self.base + c * self.bend, self.base
        return float((cond * uncond).sum() / (cond.norm() * uncond.norm()))


def test_the_cosine_criterion_drops_exactly_the_similar_samples():
    toy = Directions()
    den = Denoiser(toy, SCHEDULE, sample_shape=(1, 4, 4))
    cond = torch.tensor([0.01, 0.05, 0.5, 2.0])
    threshold = 0.99
    expected_drop = [toy.cosine(float(c)) >= threshold for c in cond]
    assert expected_drop == [True, True, False, False]  # the construction spans both sides
    sampler = Sampler(den, "ddim", 5, guidance_scale=3.0, adaptive_guidance=threshold)
    sampler.sample(torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)), cond=cond,
                   uncond=torch.zeros(1))
    # step 0 runs every unconditional row and finds the similar ones; from step 1 on only the others
    assert sampler.stats["guided_per_step"] == [4, 2, 2, 2, 2]
    assert sampler.stats["evaluations"] == 5 * 4 + 4 + 4 * 2
    assert sampler.stats["saved_fraction"] == pytest.approx(1 - 32 / 40)


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


def _sample(sampler, noise, labels):
    return sampler.sample(noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))


def test_nothing_drops_above_1_and_the_result_is_plain_cfg(dit):
    labels = torch.arange(6)
    noise = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = _sample(Sampler(dit, "dpmpp-2m", 6, guidance_scale=3.0), noise, labels)
    never = Sampler(dit, "dpmpp-2m", 6, guidance_scale=3.0, adaptive_guidance=1.5)
    assert torch.equal(_sample(never, noise, labels), plain)
    assert never.stats["saved_fraction"] == 0


def test_compaction_keeps_each_samples_trajectory(dit):
    labels = torch.tensor([0, 3, 5, 8, 9])
    noise = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    batch = Sampler(dit, "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97)
    together = _sample(batch, noise, labels)
    per_step = batch.stats["guided_per_step"]
    assert per_step[0] == 5 and per_step[-1] < 5 and batch.stats["saved_fraction"] > 0  # some dropped, some later
    for i in range(5):
        alone = _sample(Sampler(dit, "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97), noise[i:i + 1],
                        labels[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)


def test_adaptive_guidance_needs_guidance_and_a_sane_threshold(dit):
    with pytest.raises(ValueError, match="needs a guidance_scale"):
        Sampler(dit, "ddim", 4, adaptive_guidance=True)
    with pytest.raises(ValueError, match="cosine-similarity threshold"):
        Sampler(dit, "ddim", 4, guidance_scale=2.0, adaptive_guidance="sometimes")
    assert Sampler(dit, "ddim", 4, guidance_scale=2.0, adaptive_guidance=True).adaptive_guidance == 0.95


def test_padded_batch_buckets_keep_adaptive_guidance_exact(dit):
    """graph_denoiser(pad_batches=True) pads each call to a power-of-two batch (eager off CUDA): the
    compacted unconditional rows change the batch from step to step, the samples must not change."""
    from diffrt.runtime.graphs import graph_denoiser, pad_rows

    labels = torch.tensor([0, 3, 5, 8, 9])
    noise = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = Sampler(dit, "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97)
    padded = Sampler(graph_denoiser(dit, pad_batches=True), "dpmpp-2m", 12, guidance_scale=3.0, adaptive_guidance=0.97)
    torch.testing.assert_close(_sample(padded, noise, labels), _sample(plain, noise, labels), rtol=1e-4, atol=1e-4)
    assert padded.stats == plain.stats and len(set(plain.stats["guided_per_step"])) > 1
    (a, b), n = pad_rows((torch.arange(6), torch.arange(6) * 2))
    assert n == 6 and a.tolist() == [0, 1, 2, 3, 4, 5, 0, 0] and b.tolist() == [0, 2, 4, 6, 8, 10, 0, 0]
