"""Conditional graph nodes (issue 19 part 5): the fake backend's structure, and whole adaptive trajectories
(batch-level adaptive guidance, whole-batch early exit) against eager references of the same semantics.

The CUDA backend's node building runs on CPU against a recording stand-in for cuda-python's runtime; its
real tests are marked ``gpu``: they capture, replay twice on new noise, compare to the eager reference and
assert that a replay makes no host sync.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffrt.runtime import Sampler, models
from diffrt.runtime.conditional_graphs import (
    CudaConditionalGraphs,
    FakeConditionalGraphs,
    capture_adaptive_trajectory,
    cuda_problem,
    make_backend,
)
from diffrt.runtime.models.exits import exit_segments

STEPS = 3
NULL_CLASS = 10


@pytest.fixture(scope="module")
def den():
    return models.load("digits-dit")


def _inputs(den, seed: int, device="cpu", batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *den.sample_shape, generator=generator)
    cond = torch.randint(0, 10, (batch,), generator=generator)
    return noise.to(device), cond.to(device), torch.full((batch,), NULL_CLASS, device=device)


# ------------------------------------------------------------------------------------ eager references

def eager_guidance(sampler, noise, cond, uncond):
    """Batch-level adaptive guidance, eagerly: the unconditional pass runs while any row is guided."""
    den, batch = sampler.denoiser, noise.shape[0]
    state, guided = sampler.start(noise), torch.ones(batch, dtype=torch.bool, device=noise.device)
    scales, timesteps = sampler.plan.input_scales().tolist(), sampler.tables(noise.device)[2]
    for i in range(sampler.plan.steps):
        x_in, t = state.x * scales[i] if scales[i] != 1.0 else state.x, timesteps[i].expand(batch)
        out_cond = out_uncond = den(x_in, t, cond)
        if bool(guided.any()):
            predicted = den(x_in, t, uncond)
            similar = F.cosine_similarity(predicted.flatten(1), out_cond.flatten(1), dim=1)
            out_uncond = torch.where(guided.view(-1, 1, 1, 1), predicted, out_cond)
            guided = guided & (similar < sampler.adaptive_guidance)
        sampler.step(state, out_cond, out_uncond)
    return state.x.clone()


def eager_exit(sampler, segments, noise, cond, uncond):
    """Whole-batch early exit with CFG, eagerly: the [uncond; cond] batch stops at the first exit where
    every row's uncertainty is below the threshold."""
    dit, heads, batch = segments.dit, segments.heads, noise.shape[0]
    state = sampler.start(noise)
    scales, timesteps = sampler.plan.input_scales().tolist(), sampler.tables(noise.device)[2]
    for i in range(sampler.plan.steps):
        x_in, t = state.x * scales[i] if scales[i] != 1.0 else state.x, timesteps[i].expand(batch)
        h, c = dit.embed(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond]))
        out = None
        for k in range(len(heads.depths)):
            h, uncertainty = segments.run(k, h, c)
            if bool((uncertainty < sampler.early_exit).all()):
                out = heads.predict(dit, k, h, c)
                break
        if out is None:
            out = segments.run(len(heads.depths), h, c)
        out_uncond, out_cond = out.chunk(2)
        sampler.step(state, out_cond, out_uncond)
    return state.x.clone()


# ------------------------------------------------------------------------------------ the fake backend

def test_fake_runs_bodies_iff_their_flag_is_true_and_records_the_structure():
    graphs, seen = FakeConditionalGraphs(), []
    counter = torch.zeros((), dtype=torch.int64)

    def program():
        seen.clear()
        counter.zero_()
        first, second, loop = graphs.handle(), graphs.handle(), graphs.handle()
        graphs.set_condition(first, torch.tensor(True))
        graphs.set_condition(second, torch.tensor([False]))

        def outer():
            seen.append("outer")
            inner = graphs.handle()
            graphs.set_condition(inner, torch.tensor(False))
            graphs.if_(inner, lambda: seen.append("inner"), "inner")

        graphs.if_(first, outer, "outer")
        graphs.if_(second, lambda: seen.append("second"), "second")

        def step():
            counter.add_(1)
            graphs.set_condition(loop, counter < 3)

        graphs.set_condition(loop, counter < 3)
        graphs.while_(loop, step, "loop")

    replay = graphs.capture(program, torch.device("cpu"))
    for _ in range(2):  # a replay records afresh
        assert seen == ["outer"] and int(counter) == 3 and graphs.handles == 4
        assert [(n.kind, n.label, n.runs) for n in graphs.nodes] == [
            ("if", "outer", 1), ("if", "inner", 0), ("if", "second", 0), ("while", "loop", 3)]
        replay.replay()


def test_fake_rejects_bad_flags_and_unset_handles():
    graphs = FakeConditionalGraphs()
    handle = graphs.handle()
    with pytest.raises(TypeError, match="bool tensor of one element"):
        graphs.set_condition(handle, torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        graphs.set_condition(handle, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="never set"):
        graphs.if_(handle, lambda: None)


def test_backend_choice():
    assert isinstance(make_backend("auto", torch.device("cpu")), FakeConditionalGraphs)
    with pytest.raises(ValueError, match="backend must be"):
        make_backend("nope", torch.device("cpu"))
    ok, reason = CudaConditionalGraphs.available()
    assert ok == (cuda_problem() is None) and (ok or reason)


# ------------------------------------------------------------------------------------ whole trajectories

def test_guidance_trajectory_equals_the_eager_reference_and_skips_bodies(den):
    sampler = Sampler(den, "dpmpp-2m", steps=STEPS, guidance_scale=3.0, adaptive_guidance=0.9)
    graphs = FakeConditionalGraphs()
    runner = capture_adaptive_trajectory(sampler, *_inputs(den, 0), backend=graphs)
    noise, cond, uncond = _inputs(den, 1)  # a replay on new inputs, the null class given once for all rows
    out = runner(noise, cond, uncond[:1])
    torch.testing.assert_close(out, eager_guidance(sampler, noise, cond, uncond), rtol=0, atol=0)
    ran = runner.bodies_run()
    assert [n.runs for n in graphs.nodes] == [int(r) for r in ran] and len(ran) == STEPS
    assert ran[0] and not ran[-1], ran  # the first step is guided; by the last no row is
    assert graphs.nodes[-1].label == f"step {STEPS - 1}: unconditional pass"
    # the per-sample eager sampler makes the same decisions; its batched model calls round differently
    torch.testing.assert_close(out, sampler.sample(noise, cond=cond, uncond=uncond), rtol=1e-4, atol=1e-5)


def test_exit_trajectory_equals_the_eager_reference_and_skips_bodies(den):
    sampler = Sampler(den, "dpmpp-2m", steps=STEPS, guidance_scale=3.0, early_exit=0.2, early_exit_scope="batch",
                      early_exit_sync=True)
    segments = exit_segments(den.model, graphs=False)
    exits = len(den.model.exit_heads.depths)
    noise, cond, uncond = _inputs(den, 3)
    graphs = FakeConditionalGraphs()
    runner = capture_adaptive_trajectory(sampler, noise, cond, uncond, backend=graphs, segments=segments)
    noise, cond, uncond = _inputs(den, 4)
    out = runner(noise, cond, uncond)
    torch.testing.assert_close(out, eager_exit(sampler, segments, noise, cond, uncond), rtol=0, atol=0)
    ran = runner.bodies_run()
    assert len(graphs.nodes) == len(ran) == STEPS * exits
    assert [n.runs for n in graphs.nodes] == [int(r) for r in ran]
    assert any(ran) and not all(ran), ran
    for step in range(STEPS):  # once the batch stopped, no later segment of that call runs
        row = ran[step * exits:(step + 1) * exits]
        assert row == sorted(row, reverse=True), row
    torch.testing.assert_close(out, sampler.sample(noise, cond=cond, uncond=uncond), rtol=1e-4, atol=1e-5)


def test_trajectory_argument_errors(den):
    noise, cond, uncond = _inputs(den, 5)
    with pytest.raises(ValueError, match="exactly one"):
        capture_adaptive_trajectory(Sampler(den, "ddim", steps=2, guidance_scale=3.0), noise, cond, uncond, "fake")
    exiting = Sampler(den, "ddim", steps=2, early_exit=0.2, early_exit_scope="batch")
    with pytest.raises(ValueError, match="exit_segments"):
        capture_adaptive_trajectory(exiting, noise, cond, backend="fake")
    per_sample = Sampler(den, "ddim", steps=2, early_exit=0.2)
    with pytest.raises(ValueError, match="early_exit_scope='batch'"):
        capture_adaptive_trajectory(per_sample, noise, cond, backend="fake", segments=exit_segments(den.model, False))
    guided = Sampler(den, "ddim", steps=2, guidance_scale=3.0, adaptive_guidance=0.95)
    with pytest.raises(ValueError, match="uncond"):
        capture_adaptive_trajectory(guided, noise, cond, backend="fake")


# ------------------------------------------------------------------------------------ the CUDA backend

def _cuda_or_skip():
    problem = cuda_problem()
    if problem is not None:
        pytest.skip(f"conditional CUDA graphs unavailable: {problem}")


def _replay_without_syncs(runner, *inputs):
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["guidance", "exit"])
def test_cuda_trajectory_replays_without_syncs_and_matches_eager(feature):
    _cuda_or_skip()
    den = models.load("digits-dit", device="cuda")
    if feature == "guidance":
        sampler, segments = Sampler(den, "dpmpp-2m", steps=STEPS, guidance_scale=3.0, adaptive_guidance=0.95), None
        reference = eager_guidance
    else:
        sampler = Sampler(den, "dpmpp-2m", steps=STEPS, guidance_scale=3.0, early_exit=0.2, early_exit_scope="batch")
        segments = exit_segments(den.model, graphs=False)

        def reference(s, *inputs):
            return eager_exit(s, segments, *inputs)
    runner = capture_adaptive_trajectory(sampler, *_inputs(den, 0, "cuda", 4), backend="cuda", segments=segments)
    for seed in (1, 2):
        inputs = _inputs(den, seed, "cuda", 4)
        out = _replay_without_syncs(runner, *inputs)
        torch.testing.assert_close(out, reference(sampler, *inputs), rtol=1e-4, atol=1e-4)
        fake = capture_adaptive_trajectory(sampler, *inputs, backend="fake", segments=segments)
        assert runner.bodies_run() == fake.bodies_run()


# ------------------------------------------------------------------------------------ the CUDA backend's node building, on CPU

class _RecordingRuntime:
    """Stands in for ``cuda.bindings.runtime`` (cuda-python's names): records the calls, answers as a capturing
    stream would."""

    class cudaStreamCaptureStatus:
        cudaStreamCaptureStatusActive = "active"

    class cudaGraphConditionalNodeType:
        cudaGraphCondTypeIf, cudaGraphCondTypeWhile = "if", "while"

    class cudaGraphNodeType:
        cudaGraphNodeTypeConditional = "conditional"

    class cudaStreamUpdateCaptureDependenciesFlags:
        cudaStreamSetCaptureDependencies = "set"

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = "thread-local"

    def __init__(self):
        self.calls = []
        self.graph_of = {"parent": "main graph"}

    @staticmethod
    def cudaGraphNodeParams():
        from types import SimpleNamespace
        return SimpleNamespace(type=None, conditional=SimpleNamespace(handle=None, type=None, size=0, phGraph_out=[]))

    def cudaStreamGetCaptureInfo(self, stream):
        self.calls.append(("info", stream))
        return 0, "active", 7, self.graph_of[stream], [f"last node on {stream}"], None, 1

    def cudaGraphAddNode(self, graph, dependencies, *rest):  # rest: [edge data (13.x),] count, params
        params = rest[-1]
        self.calls.append(("add", graph, dependencies, rest[:-1], params.conditional.type, params.conditional.handle))
        params.conditional.phGraph_out = [f"body of {params.conditional.handle}"]
        return 0, f"node {params.conditional.handle}"

    def cudaStreamUpdateCaptureDependencies(self, stream, nodes, *rest):
        self.calls.append(("depend", stream, nodes, rest))
        return (0,)

    def cudaStreamBeginCaptureToGraph(self, stream, graph, *rest):
        self.calls.append(("begin", stream, graph))
        self.graph_of[stream] = graph
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.calls.append(("end", stream))
        return 0, self.graph_of.pop(stream)


@pytest.mark.parametrize("bindings", [(12, 6), (13, 0)])
def test_cuda_backend_builds_nested_conditional_nodes_in_order(monkeypatch, bindings):
    """The node-building code of CudaConditionalGraphs against a recording runtime (no GPU): the conditional
    node follows the stream's captured work, the stream then depends on it, the body is captured on a side
    stream into the node's body graph (nested bodies on a stream per depth), and cuda-bindings 13's extra
    edge-data arguments are passed only to 13.x."""
    import contextlib
    from types import SimpleNamespace

    from diffrt.runtime import conditional_graphs

    runtime, current = _RecordingRuntime(), ["parent"]

    @contextlib.contextmanager
    def on_stream(stream):
        previous = current[0]
        current[0] = stream.cuda_stream
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(conditional_graphs, "_bindings_version", lambda: bindings)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=current[0]))
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", lambda pool, device=None: contextlib.nullcontext())
    graphs = CudaConditionalGraphs()
    graphs._cudart = runtime
    graphs._streams = [SimpleNamespace(cuda_stream=f"side {depth}") for depth in range(2)]
    graphs._pools = [None, None]

    def outer():
        runtime.calls.append(("outer body on", current[0]))
        graphs.while_("inner", lambda: runtime.calls.append(("inner body on", current[0])))

    graphs.if_("outer", outer)
    edges = (None,) if bindings >= (13, 0) else ()
    assert runtime.calls == [
        ("info", "parent"),
        ("add", "main graph", ["last node on parent"], (*edges, 1), "if", "outer"),
        ("depend", "parent", ["node outer"], (*edges, 1, "set")),
        ("begin", "side 0", "body of outer"),
        ("outer body on", "side 0"),
        ("info", "side 0"),
        ("add", "body of outer", ["last node on side 0"], (*edges, 1), "while", "inner"),
        ("depend", "side 0", ["node inner"], (*edges, 1, "set")),
        ("begin", "side 1", "body of inner"),
        ("inner body on", "side 1"),
        ("end", "side 1"),
        ("end", "side 0"),
    ]
    assert current == ["parent"] and graphs._depth == 0
