"""Blocking host syncs and host-to-device copies per step of every sampling configuration (issue 19), counted
on CPU with the residency emulation (diffrt.runtime.residency) on the digits DiT: the plain loop of every
solver preset, with and without CFG, makes none, nor does its start(); each adaptive feature is held to the
same (the marks say what still syncs). Counts are taken after a warm-up call (caches filled, as before a
graph capture), over three steps of a batch of one (solver presets) or two (adaptive features)."""
from __future__ import annotations

import pytest
import torch
from diffrt.bench import bench_syncs, harness
from diffrt.bench.bench_syncs import sampling_counts, tick_counts
from diffrt.runtime import Denoiser, NoiseSchedule, Sampler, models, optimize
from diffrt.runtime.deadline import DeadlinePolicy
from diffrt.runtime.linear_ag import LinearAG
from diffrt.runtime.residency import Counts, count_sampling, sync_counter
from diffrt.runtime.solvers import PRESETS

FLOW = NoiseSchedule.from_config({"num_train_timesteps": 1000, "prediction_type": "flow", "shift": 1.0,
                                  "_class_name": "FlowMatchEulerDiscreteScheduler"})
STEPS = 3
NONE = Counts()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on a shared two-core machine spin against each other: one is ~20x faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit() -> Denoiser:
    return models.load("digits-dit")


def _flow(den: Denoiser) -> Denoiser:
    """The DiT behind a flow-matching schedule: meaningless samples, the flow solvers' real loop."""
    return Denoiser(den.model, FLOW, sample_shape=den.sample_shape)


def _explain(events) -> list[str]:
    """What was counted at start(), in the loop or per call, and where (the assertion message)."""
    return [f"{e.section}: {e.kind} {e.op} at {e.where}" for e in events if e.section in ("start", "loop", "calls")]


@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("solver", sorted(PRESETS))
def test_every_solver_preset_steps_without_syncs_or_copies(dit, solver, guidance_scale):
    den = _flow(dit) if solver.startswith("flow") else dit
    options = {"skip_prk_steps": True} if solver == "pndm" else {}
    counts = sampling_counts(den, solver, STEPS, batch=1, guidance_scale=guidance_scale, **options)
    assert counts.steps >= STEPS
    assert counts.per_step == NONE, _explain(counts.events)
    assert counts.start == NONE, _explain(counts.events)  # device noise drawn on the device: start() is capturable


def test_the_emulation_finds_the_syncs_of_diffusers_ddim_loop():
    """diffusers' DDIM step reads int(timestep) to index alphas_cumprod and compares prev_timestep >= 0 on
    the host; diffrt's sampler reproducing it reads nothing."""
    case = bench_syncs.make_case("ddim", "tiny", bench_syncs.SHAPE, 5, torch.device("cpu"))
    diffusers, ours = bench_syncs.solver_counts(case, "diffusers"), bench_syncs.solver_counts(case, "diffrt")
    assert diffusers["syncs_per_step"] >= 5 and "scheduling_ddim.py" in diffusers["where"]
    assert diffusers["setup_h2d"] == 1  # set_timesteps(device=...): the timesteps copied once
    assert ours["syncs_per_step"] == ours["h2d_per_step"] == 0 and ours["counted_steps"] == 5


def test_adaptive_guidance_steps_without_syncs(dit):
    counts = sampling_counts(dit, adaptive_guidance=True)
    assert counts.stats["saved_fraction"] > 0  # some samples dropped their unconditional pass
    assert counts.per_step.syncs == 0 and counts.per_step.h2d == 0, _explain(counts.events)


def _linear_ag(den: Denoiser) -> LinearAG:
    plan = Sampler(den, "dpmpp-2m", STEPS).plan
    return LinearAG.for_plan(torch.tensor([[1.0, 0.0, 0.0, 0.0]] * STEPS), (1,), plan)


@pytest.mark.parametrize("adaptive", [None, True], ids=["alone", "with-adaptive-guidance"])
def test_linear_ag_steps_without_syncs(dit, adaptive):
    counts = sampling_counts(dit, linear_ag=_linear_ag(dit), adaptive_guidance=adaptive)
    assert counts.stats["estimated_steps"] == 1
    assert counts.per_step.syncs == 0 and counts.per_step.h2d == 0, _explain(counts.events)


@pytest.mark.parametrize("scope,graphs", [("sample", False), ("batch", False), ("sample", True)],
                         ids=["per-sample", "whole-batch", "segment-graphs"])
def test_early_exit_steps_without_syncs(dit, scope, graphs):
    counts = sampling_counts(dit, early_exit=True, early_exit_scope=scope, early_exit_graphs=graphs)
    assert min(counts.stats["early_exit"]["exits"]) < dit.model.num_blocks  # rows did leave early
    assert counts.per_step.syncs == 0 and counts.per_step.h2d == 0, _explain(counts.events)


def test_step_cache_steps_without_syncs(dit):
    counts = sampling_counts(dit, make=lambda den: optimize(den, step_cache=0.1))
    assert counts.per_step.syncs == 0 and counts.per_step.h2d == 0, _explain(counts.events)


@pytest.mark.parametrize("solver", ["dpmpp-2m-sde", "euler-ancestral", "lcm"])
def test_stochastic_solvers_start_without_copies_with_a_cpu_generator(dit, solver):
    counts = sampling_counts(dit, solver, generator=torch.Generator().manual_seed(1))
    assert counts.per_step == NONE, _explain(counts.events)
    assert counts.start == NONE, _explain(counts.events)


# ---------------------------------------------------------------------------------------------- stream

def test_stream_tick_without_syncs_or_copies(dit):
    per_tick, events = tick_counts(dit)
    assert (per_tick.syncs, per_tick.h2d) == (0, 0), _explain(events)


def test_stream_tick_with_python_int_conditions_makes_no_copies(dit):
    per_tick, events = tick_counts(dit, cond=3, uncond=models.NULL_CLASS, cfg_type="full", guidance_scale=2.0)
    assert per_tick.h2d == 0, _explain(events)


def test_stream_similarity_filter_adds_no_syncs(dit):
    plain, _ = tick_counts(dit)
    filtered, events = tick_counts(dit, similarity_threshold=0.98)  # distinct frames: never skipped
    assert (filtered.syncs, filtered.h2d) == (plain.syncs, plain.h2d), _explain(events)


def test_deadline_policy_adds_no_syncs(dit):
    plain, _ = tick_counts(dit)
    with_deadline, events = tick_counts(dit, deadline=DeadlinePolicy(budget_ms=1e9))  # never degrades
    assert (with_deadline.syncs, with_deadline.h2d) == (plain.syncs, plain.h2d), _explain(events)
    assert bench_syncs.deadline_cuda_synchronizations(dit) == 0  # on CUDA: no torch.cuda.synchronize per tick


# ---------------------------------------------------------------------------------------------- on CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc", "heun", "dpmpp-2m-sde"])
def test_the_plain_loop_does_not_sync_on_cuda(solver, guidance_scale):
    den = models.load("digits-dit", device="cuda")
    noise = torch.randn(2, 1, 16, 16, device="cuda")
    cond, uncond = torch.arange(2, device="cuda"), torch.full((2,), models.NULL_CLASS, device="cuda")
    sampler = Sampler(den, solver, STEPS, guidance_scale=guidance_scale)
    with sync_counter("cuda") as counter:
        counts = count_sampling(counter, sampler, noise, cond=cond, uncond=uncond if guidance_scale else None,
                                check=False)
    assert counts.per_step == NONE and counts.start == NONE, _explain(counts.events)


@pytest.mark.gpu
def test_capture_and_replay_raise_no_sync_error_on_cuda():
    """The whole loop captured and replayed under set_sync_debug_mode("error") (torch.cuda.graph's own
    synchronize on entry stays outside)."""
    den = models.load("digits-dit", device="cuda")
    sampler = Sampler(den, "dpmpp-2m", STEPS, guidance_scale=3.0)
    noise = torch.randn(2, 1, 16, 16, device="cuda")
    cond, uncond = torch.arange(2, device="cuda"), torch.full((2,), models.NULL_CLASS, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler.sample(noise, cond, uncond, check=False)  # warm-up: tables and kernels, before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), harness.forbid_host_sync("cuda"):
        out = sampler.sample(noise, cond, uncond, check=False)
    with harness.forbid_host_sync("cuda"):
        noise.copy_(torch.randn_like(noise))
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and out.abs().max() > 0
