"""Layer early exit for the digits DiT: the training script on a small budget, threshold 0 = the full
model, a high threshold exits at the first head, rows exit one by one keeping their own trajectories,
and the blocks saved are counted."""
import pytest
import torch
from diffrt.runtime import Sampler, models
from diffrt.runtime.early_exit import ExitState
from diffrt.runtime.models import exits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The DiT with heads trained for a few steps (seeded), saved and loaded back like the shipped ones."""
    import shutil

    folder = tmp_path_factory.mktemp("weights")
    for name in ("digits-dit.json", "digits-dit.safetensors"):
        shutil.copy(models.WEIGHTS_DIR / name, folder / name)
    den = models.load("digits-dit", weights_dir=folder)
    heads, record = exits.train_exit_heads(den.model, den.schedule, every=2, steps=3, batch_size=8, progress=False)
    exits.save_exit_heads(heads, record, folder)
    return models.load("digits-dit", weights_dir=folder), heads, record, folder


def test_training_is_seeded_and_saved(trained):
    den, heads, record, folder = trained
    assert record["depths"] == [2, 4] and record["steps"] == 3
    assert models.card("digits-dit", folder)["exit_heads"]["file"] == exits.EXITS_FILE
    loaded = den.model.exit_heads
    assert loaded is not None and loaded.depths == [2, 4]
    again, _ = exits.train_exit_heads(models.load("digits-dit").model, den.schedule, every=2, steps=3, batch_size=8,
                                      progress=False)
    for (name, a), (_, b) in zip(heads.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(den.model.state_dict()) == set(models.load("digits-dit").model.state_dict())  # heads kept apart


def _sample(den, early_exit, scope="sample", labels=(0, 1, 2, 3), seed=0, sync=False):
    labels = torch.tensor(labels)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    sampler = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0, early_exit=early_exit, early_exit_scope=scope,
                      early_exit_sync=sync)
    x = sampler.sample(noise, cond=labels, uncond=torch.full_like(labels, models.NULL_CLASS))
    return x, sampler.stats.get("early_exit")


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_threshold_zero_is_the_full_model_and_one_exits_first(trained, scope):
    den, *_ = trained
    full, _ = _sample(den, None)
    never, stats = _sample(den, 0.0, scope)
    rows = 5 * 8  # 5 steps, 4 conditional + 4 unconditional rows
    assert torch.equal(never, full) and stats["blocks_saved_fraction"] == 0 and stats["exits"] == {6: rows}
    first, stats = _sample(den, 1.0, scope, sync=True)  # every row confident at the first exit: all leave there
    assert stats["exits"] == {2: rows} and stats["blocks_saved_fraction"] == pytest.approx(1 - 2 / 6)
    assert not torch.equal(first, full)
    # planned from the previous call (no host read): the first call has no plan, runs every row to the end
    # and takes exit 2's outputs; the later calls let every row go at exit 2: the same samples
    planned, stats = _sample(den, 1.0, scope)
    assert torch.equal(planned, first)
    assert stats["exits"] == {2: rows - 8, 6: 8}
    assert stats["blocks_saved_fraction"] == pytest.approx(1 - (2 * (rows - 8) + 6 * 8) / (6 * rows))


def test_a_sampler_plans_later_trajectories_from_the_same_calls_of_earlier_ones(trained):
    den, *_ = trained
    labels = torch.tensor((0, 1, 2, 3))
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0, early_exit=1.0)
    uncond = torch.full_like(labels, models.NULL_CLASS)
    first = sampler.sample(noise, cond=labels, uncond=uncond)
    assert sampler.stats["early_exit"]["exits"] == {2: 32, 6: 8}  # the first call had no plan
    again = sampler.sample(noise, cond=labels, uncond=uncond)
    assert sampler.stats["early_exit"]["exits"] == {2: 40}  # its first call planned from the first trajectory's
    assert torch.equal(again, first)


def test_the_plan_follows_the_observed_fractions():
    state = ExitState(0.2)
    assert state.plan(8, 2) == [8, 8]  # nothing observed yet: every row runs on
    state.begin(4, 3)
    state.observe(torch.tensor([3, 1]), 4)  # of 4 rows, 3 unfinished after exit 1, 1 after exit 2
    assert state.plan(8, 2) == [6, 2] and state.plan(5, 2) == [4, 2]  # rounded up
    state.begin(4, 3)
    state.observe(torch.tensor([0, 2]), 4)  # a count cannot grow along the exits of one call's plan
    assert state.plan(4, 2) == [0, 0]
    assert state.plan(4, 3) == [4, 4, 4]  # another model's exits: no plan


def _threshold_between_rows(den, labels):
    """An uncertainty threshold that splits the rows of the first call at the first exit (some leave)."""
    heads = den.model.exit_heads
    x = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(labels),), 999.0)
    with torch.no_grad():
        h, c = den.model.embed(x, t, torch.tensor(labels))
        for block in den.model.blocks[: heads.depths[0]]:
            h = block(h, c)
        u = heads.uncertainty_of(0, h, c).sort().values
    return float((u[len(u) // 2 - 1] + u[len(u) // 2]) / 2)


def test_rows_exit_one_by_one_and_each_keeps_its_own_trajectory():
    den = models.load("digits-dit")  # the shipped heads
    labels = (0, 3, 5, 8, 9, 1)
    threshold = _threshold_between_rows(den, labels)
    together, stats = _sample(den, threshold, labels=labels, seed=0, sync=True)
    assert len(stats["exits"]) >= 2  # rows left at different depths
    assert 0 < stats["blocks_saved_fraction"] < 1
    for i, label in enumerate(labels):
        noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))[i:i + 1]
        sampler = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0, early_exit=threshold, early_exit_sync=True)
        y = torch.tensor([label])
        alone = sampler.sample(noise, cond=y, uncond=torch.full_like(y, models.NULL_CLASS))
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    # the batch scope waits for the least confident row: it saves less at the same threshold
    _, batch_stats = _sample(den, threshold, "batch", labels=labels, seed=0, sync=True)
    assert batch_stats["blocks_saved_fraction"] < stats["blocks_saved_fraction"]
    # planned from the previous calls: rows are compacted without a host read, and still exit at several depths
    planned, planned_stats = _sample(den, threshold, labels=labels, seed=0)
    assert len(planned_stats["exits"]) >= 2 and 0 < planned_stats["blocks_saved_fraction"] < 1


def test_early_exit_needs_heads_and_a_threshold():
    with pytest.raises(ValueError, match="exit heads"):
        Sampler(models.load("digits-unet"), "ddim", 4, early_exit=0.1)
    den = models.load("digits-dit")
    den.model.attach_exit_heads(exits.ExitHeads(den.model, 3))
    with pytest.raises(ValueError, match="threshold in"):
        Sampler(den, "ddim", 4, early_exit=2.0)
    from diffrt.runtime import optimize

    with pytest.raises(ValueError, match="do not compose"):
        Sampler(optimize(models.load("digits-dit"), step_cache=0.1), "ddim", 4, early_exit=0.1)
    with pytest.raises(ValueError, match="early_exit_scope"):
        Sampler(den, "ddim", 4, early_exit=0.1, early_exit_scope="token")
    with pytest.raises(ValueError, match="no exit before the last"):
        exits.ExitHeads(den.model, 6)


def _padded_equals_plain(den, device):
    labels = (0, 3, 5, 8, 9, 1)  # 12 rows with CFG: not a power of two, so the graph path pads
    threshold = _threshold_between_rows(den, labels)
    y = torch.tensor(labels, device=device)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for graphs in (False, True):
        sampler = Sampler(den, "dpmpp-2m", 5, guidance_scale=3.0, early_exit=threshold, early_exit_graphs=graphs)
        results.append((sampler.sample(noise, cond=y, uncond=torch.full_like(y, models.NULL_CLASS)),
                        sampler.stats["early_exit"]))
    (plain, plain_stats), (segmented, segmented_stats) = results
    assert len(plain_stats["exits"]) >= 2 and segmented_stats == plain_stats
    torch.testing.assert_close(segmented, plain, rtol=1e-4, atol=1e-4)
    return exits.exit_segments(den.model, True)


def test_segment_runners_pad_compacted_batches_and_equal_the_plain_exit():
    segments = _padded_equals_plain(models.load("digits-dit"), "cpu")
    assert segments.bounds == [0, 1, 2, 3, 4, 5, 6]
    h = torch.randn(3, 64, 256)
    c = torch.randn(3, 256)
    padded = segments.run(0, h, c)
    alone = [segments.functions[0](h[i:i + 1], c[i:i + 1]) for i in range(3)]
    for got, *rows in zip(padded, *alone):
        assert got.shape[0] == 3
        torch.testing.assert_close(got, torch.cat(rows), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_segment_graphs_replay_on_cuda():
    den = models.load("digits-dit", device="cuda")
    segments = _padded_equals_plain(den, "cuda")
    buckets = [len(runner.timings) for runner in segments.functions]  # captured shapes per segment
    assert buckets[0] == 1 and max(buckets) <= 5  # 12 rows pad to 16; compacted ones to 8, 4, 2, 1
    assert sum(t.replays for runner in segments.functions for t in runner.timings.values()) > 0


def test_int8_groups_follow_the_rows_that_keep_running():
    """Per-sample early exit compacts the batch inside the model: a calibrated INT8 layer must then see
    the remaining samples' timestep groups (it used to fail: more rows than groups)."""
    from diffrt.export import calibrate
    from diffrt.runtime import optimize, quality

    den = models.load("digits-dit")
    labels = torch.arange(8) % 10
    uncond = torch.full_like(labels, models.NULL_CLASS)
    calibration = calibrate(den, "dpmpp-2m", 6, cond=labels, uncond=uncond, guidance_scale=3.0, seeds=(5,),
                            progress=False)
    fast = optimize(den, int8=calibration)
    noise = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampler = Sampler(fast, "dpmpp-2m", 6, guidance_scale=3.0, early_exit=0.2)
        ours = sampler.sample(noise, cond=labels, uncond=uncond)
        float_exit = Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0, early_exit=0.2).sample(noise, cond=labels,
                                                                                             uncond=uncond)
    exits = sampler.stats["early_exit"]["exits"]
    assert sum(count for depth, count in exits.items() if depth < den.model.num_blocks) > 0, exits  # rows did leave
    assert quality.psnr(ours, float_exit).mean() > 30  # INT8 error only (the same rows exit at the same depths)
    with pytest.raises(ValueError, match="early_exit_graphs=True with a calibrated INT8 denoiser"):
        Sampler(fast, "dpmpp-2m", 6, guidance_scale=3.0, early_exit=0.2, early_exit_graphs=True)
