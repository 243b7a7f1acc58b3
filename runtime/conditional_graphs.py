"""Conditional graph nodes: a whole adaptive trajectory as one CUDA graph, its decisions taken on the device.

Adaptive guidance and early exit decide per step whether to run work (the unconditional pass, the blocks
after an exit). Eagerly the host must learn the decision (a sync, or a read one step late); in a CUDA graph
of static shapes the decision can stay on the device as a *conditional node* (CUDA 12.4+): an IF node runs
its body graph iff a condition value, set by a device kernel from a device flag, is non-zero.

:class:`ConditionalGraphs` is the small interface the trajectory code is written against:

* ``capture(program, device)``: run ``program()`` once into a replayable trajectory (:class:`Replayable`);
* ``handle()``: a new condition handle; ``set_condition(handle, flag)``: the condition is a device bool flag
  (0-dim or one element), read when the stream reaches this point;
* ``if_(handle, body, label)``: ``body()`` runs iff the condition is true (its ops go into the IF node's body
  graph); ``while_(handle, body, label)``: repeats while it is true (``body`` must set it again).

``if_`` takes a callable rather than being a ``with`` block: an eager implementation must be able to skip
the body, and a ``with`` block cannot skip its own body. Two implementations:

* :class:`FakeConditionalGraphs`: eager (CPU or CUDA), reads each flag on the host, runs a body iff its
  flag was true and records the node structure (:attr:`FakeConditionalGraphs.nodes`: handle, kind, label,
  how many times the body ran). The CPU tests run on it; it is also the warm-up run before a capture.
* :class:`CudaConditionalGraphs`: cuda-python (``cuda.bindings``, imported lazily; ``pip install
  'diffrt[cuda]'``). The trajectory is captured inside ``torch.cuda.graph`` (its memory pool, instantiated
  and replayed by torch, as NVIDIA NeMo does); an IF node is added to the graph being captured with
  ``cudaGraphConditionalHandleCreate`` + ``cudaGraphAddNode`` (``cudaGraphNodeTypeConditional``,
  ``cudaGraphCondTypeIf`` / ``While``), the parent stream's capture then depends on that node
  (``cudaStreamUpdateCaptureDependencies``) and the body's torch ops are captured on a side stream into the
  node's body graph (``cudaStreamBeginCaptureToGraph``). The condition is set by a one-thread kernel
  compiled at run time with NVRTC: ``cudaGraphSetConditional(handle, *flag)``.

Allocator (the risk of this approach): torch routes allocations into the graph's pool only for streams of
*its* capture (same capture id); a body stream captures into another sequence, so its allocations go to a
:class:`torch.cuda.MemPool` of their own (``torch.cuda.use_mem_pool``, one per nesting depth), kept alive
with the graph. Reusing a freed block inside that pool is safe because every body is ordered after the
nodes before its IF node and before the nodes after it. Bodies must not draw random numbers (the sampler
pre-draws its step noise) and may hold only kernels, copies and memsets (CUDA's rule for body graphs: no
host nodes, events or allocation nodes); library state created lazily (cuBLAS workspaces) is created by the
eager warm-up, run on the body stream before the capture. Not yet run on a GPU here: see the GPU tests.

Requirements: a driver for CUDA 12.4+ (IF and WHILE; IF-else needs 12.8 and is not used), cuda-bindings
12.4+ (13.x changed the argument lists of ``cudaGraphAddNode`` / ``cudaStreamUpdateCaptureDependencies``:
both are handled). :func:`cuda_problem` says why the CUDA backend cannot run, or None.

:func:`capture_adaptive_trajectory` builds a whole trajectory (every step) of a :class:`Sampler` with
batch-level adaptive guidance or whole-batch early exit on these operations (the semantics are in its
docstring) and returns a :class:`TrajectoryRunner` that replays it on new inputs with no host sync.
"""
from __future__ import annotations

import abc
import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

_ASSIGN_DEFAULT = 1  # cudaGraphCondAssignDefault: the condition starts at its default (0) at every launch
_MAX_FAKE_ITERATIONS = 1 << 20  # a fake WHILE body that never clears its condition stops here

_SETTER_SOURCE = r"""
typedef __device_builtin__ unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle handle,
                                                                      unsigned int value);
extern "C" __global__ void diffrt_set_condition(cudaGraphConditionalHandle handle, const bool *flag)
{
    cudaGraphSetConditional(handle, *flag ? 1u : 0u);
}
"""


class Replayable(Protocol):
    """A captured trajectory: ``replay()`` runs it again (on the inputs now in its static buffers)."""

    def replay(self) -> None: ...


class ConditionalGraphs(abc.ABC):
    """Build a graph whose nodes may run conditionally on device flags (module docstring)."""

    @abc.abstractmethod
    def capture(self, program: Callable[[], None], device: torch.device) -> Replayable:
        """Run ``program()`` (which calls this object's operations) once and return its replayable form."""

    @abc.abstractmethod
    def handle(self) -> Any:
        """A new condition handle (opaque) of the trajectory being captured."""

    @abc.abstractmethod
    def set_condition(self, handle: Any, flag: torch.Tensor) -> None:
        """Set ``handle``'s condition from ``flag`` (bool, one element), as its value is at this point."""

    @abc.abstractmethod
    def if_(self, handle: Any, body: Callable[[], None], label: str = "") -> None:
        """``body()`` runs iff ``handle``'s condition is true."""

    @abc.abstractmethod
    def while_(self, handle: Any, body: Callable[[], None], label: str = "") -> None:
        """``body()`` runs while ``handle``'s condition is true; the body sets the condition again."""


def _check_flag(flag: torch.Tensor) -> None:
    if not torch.is_tensor(flag) or flag.dtype != torch.bool or flag.numel() != 1:
        raise TypeError(f"a condition flag is a bool tensor of one element, got "
                        f"{flag.dtype if torch.is_tensor(flag) else type(flag).__name__} "
                        f"{tuple(flag.shape) if torch.is_tensor(flag) else ''}")


@dataclass
class NodeRecord:
    """A conditional node the fake backend went through: its handle, kind ("if" / "while"), label and how
    many times its body ran (an IF: 0 or 1)."""

    handle: int
    kind: str
    label: str
    runs: int = 0


class FakeConditionalGraphs(ConditionalGraphs):
    """The eager backend: flags read on the host (a sync on CUDA), bodies run iff their flag was true.

    ``nodes`` lists the conditional nodes of the latest run, in order (:class:`NodeRecord`); ``handles``
    counts the handles created. Each ``replay()`` runs the program again and records afresh.
    """

    def __init__(self) -> None:
        self.nodes: list[NodeRecord] = []
        self.handles = 0
        self._values: dict[int, bool] = {}

    @staticmethod
    def available() -> tuple[bool, str]:
        return True, ""

    def capture(self, program: Callable[[], None], device: torch.device) -> _FakeReplay:
        replay = _FakeReplay(self, program)
        replay.replay()
        return replay

    def handle(self) -> int:
        self.handles += 1
        return self.handles - 1

    def set_condition(self, handle: int, flag: torch.Tensor) -> None:
        _check_flag(flag)
        self._values[handle] = bool(flag.reshape(()).item())

    def _value(self, handle: int) -> bool:
        if handle not in self._values:
            raise RuntimeError(f"condition handle {handle} was never set (set_condition before if_ / while_)")
        return self._values[handle]

    def if_(self, handle: int, body: Callable[[], None], label: str = "") -> None:
        record = NodeRecord(handle, "if", label)
        self.nodes.append(record)
        if self._value(handle):
            body()
            record.runs = 1

    def while_(self, handle: int, body: Callable[[], None], label: str = "") -> None:
        record = NodeRecord(handle, "while", label)
        self.nodes.append(record)
        while self._value(handle):
            if record.runs == _MAX_FAKE_ITERATIONS:
                raise RuntimeError(f"while node {label or handle} ran {record.runs} times: its body never clears "
                                   "the condition")
            body()
            record.runs += 1


class _FakeReplay:
    """The fake's "graph": replaying runs the program again, eagerly, and records its nodes afresh."""

    def __init__(self, graphs: FakeConditionalGraphs, program: Callable[[], None]):
        self.graphs, self.program = graphs, program

    def replay(self) -> None:
        self.graphs.nodes, self.graphs.handles, self.graphs._values = [], 0, {}
        self.program()


# ------------------------------------------------------------------------------------------ the CUDA backend

def cuda_problem(device: torch.device | int | None = None) -> str | None:
    """Why :class:`CudaConditionalGraphs` cannot run here (None: it can). Imports cuda-python lazily."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not hasattr(torch.cuda, "use_mem_pool"):
        return f"torch {torch.__version__} has no torch.cuda.use_mem_pool (the body graphs' allocations need it)"
    try:
        import cuda.bindings  # noqa: PLC0415
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError as error:
        return f"cuda-python is not installed (pip install 'diffrt[cuda]', i.e. cuda-bindings): {error}"
    if _bindings_version() < (12, 4):
        return f"cuda-bindings {cuda.bindings.__version__} is too old: conditional nodes need 12.4+"
    error, driver = cudart.cudaDriverGetVersion()
    if int(error) != 0:
        return f"cudaDriverGetVersion failed: {error}"
    if driver < 12040:
        return f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}: conditional nodes need 12.4+"
    device = torch.cuda.current_device() if device is None else device
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    try:
        _setter_kernel(device)
    except Exception as error:  # noqa: BLE001 - NVRTC or the module load: said, not raised
        return f"the condition-setting kernel could not be built and loaded (NVRTC): {error}"
    return None


def _bindings_version() -> tuple[int, int]:
    import cuda.bindings  # noqa: PLC0415

    major, minor = cuda.bindings.__version__.split(".")[:2]
    return int(major), int(minor)


def _checked(name: str, result: Any) -> Any:
    """The values of a cuda-python call's (error, *values) result; RuntimeError naming ``name`` on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"{name} failed: {error}")
    return values[0] if len(values) == 1 else tuple(values)


def _setter_kernel(device: torch.device) -> Any:
    """The condition-setting kernel for ``device`` (compiled and loaded once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        torch.cuda.synchronize()  # the runtime makes the device's primary context current in this thread
        return _compiled_setter(index, torch.cuda.get_device_capability(index))


@functools.cache
def _compiled_setter(index: int, capability: tuple[int, int]) -> Any:
    """``_SETTER_SOURCE`` compiled by NVRTC to PTX for ``capability`` and loaded in device ``index``'s
    (current) context."""
    import numpy as np  # noqa: PLC0415
    from cuda.bindings import driver, nvrtc  # noqa: PLC0415

    program = _checked("nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(_SETTER_SOURCE.encode(),
                                                                      b"diffrt_set_condition.cu", 0, [], []))
    options = [f"--gpu-architecture=compute_{capability[0]}{capability[1]}".encode()]
    (error,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    if int(error) != 0:
        size = _checked("nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(program))
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(program, log)
        raise RuntimeError(f"NVRTC could not compile the condition setter: {error}\n{bytes(log).decode(errors='replace')}")
    ptx = bytearray(_checked("nvrtcGetPTXSize", nvrtc.nvrtcGetPTXSize(program)))
    _checked("nvrtcGetPTX", nvrtc.nvrtcGetPTX(program, ptx))
    image = np.frombuffer(bytes(ptx), dtype=np.uint8)
    module = _checked("cuModuleLoadData", driver.cuModuleLoadData(image.ctypes.data))
    return _checked("cuModuleGetFunction", driver.cuModuleGetFunction(module, b"diffrt_set_condition"))


class CudaConditionalGraphs(ConditionalGraphs):
    """Conditional nodes through cuda-python inside a ``torch.cuda.graph`` capture (module docstring)."""

    def __init__(self) -> None:
        self._depth = 0
        self._streams: list[torch.cuda.Stream] = []
        self._pools: list[Any] = []
        self._keep: list[torch.Tensor] = []  # flags the setter kernels read at every replay

    @staticmethod
    def available() -> tuple[bool, str]:
        problem = cuda_problem()
        return problem is None, problem or ""

    def capture(self, program: Callable[[], None], device: torch.device) -> _CudaReplay:
        problem = cuda_problem(device)
        if problem is not None:
            raise RuntimeError(f"conditional CUDA graphs are unavailable: {problem}")
        device = torch.device(device)
        self._kernel = _setter_kernel(device)
        self._cudart = _runtime()
        with torch.cuda.device(device):
            self._body_stream(0).wait_stream(torch.cuda.current_stream())
            warm = FakeConditionalGraphs()  # lazy library state (cuBLAS on the body stream) outside the capture
            with torch.cuda.stream(self._streams[0]):
                warm.capture(program, device)
            torch.cuda.current_stream().wait_stream(self._streams[0])
            graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                program()
        return _CudaReplay(graph, list(self._pools), list(self._keep))

    def _body_stream(self, depth: int) -> torch.cuda.Stream:
        while len(self._streams) <= depth:
            self._streams.append(torch.cuda.Stream())
            self._pools.append(torch.cuda.MemPool())
        return self._streams[depth]

    def _capture_info(self, stream: torch.cuda.Stream) -> tuple[Any, list[Any]]:
        status, _, graph, dependencies, *_ = _checked("cudaStreamGetCaptureInfo",
                                                      self._cudart.cudaStreamGetCaptureInfo(stream.cuda_stream))
        if status != self._cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive:
            raise RuntimeError("conditional nodes are added while capturing: use them inside capture()")
        return graph, list(dependencies or [])

    def handle(self) -> Any:
        graph, _ = self._capture_info(torch.cuda.current_stream())
        return _checked("cudaGraphConditionalHandleCreate",
                        self._cudart.cudaGraphConditionalHandleCreate(graph, 0, _ASSIGN_DEFAULT))

    def set_condition(self, handle: Any, flag: torch.Tensor) -> None:
        _check_flag(flag)
        if not flag.is_cuda or not flag.is_contiguous():
            raise ValueError("a condition flag for a CUDA graph is a contiguous CUDA tensor")
        from cuda.bindings import driver  # noqa: PLC0415

        self._keep.append(flag)
        arguments = ((int(handle), flag.data_ptr()), (ctypes.c_ulonglong, ctypes.c_void_p))
        _checked("cuLaunchKernel", driver.cuLaunchKernel(self._kernel, 1, 1, 1, 1, 1, 1, 0,
                                                         torch.cuda.current_stream().cuda_stream, arguments, 0))

    def if_(self, handle: Any, body: Callable[[], None], label: str = "") -> None:
        self._conditional(handle, body, self._cudart.cudaGraphConditionalNodeType.cudaGraphCondTypeIf)

    def while_(self, handle: Any, body: Callable[[], None], label: str = "") -> None:
        self._conditional(handle, body, self._cudart.cudaGraphConditionalNodeType.cudaGraphCondTypeWhile)

    def _conditional(self, handle: Any, body: Callable[[], None], kind: Any) -> None:
        """Add a conditional node after the current stream's captured work, capture ``body`` into its body
        graph on a side stream, and make the current stream's next work depend on the node."""
        rt, stream = self._cudart, torch.cuda.current_stream()
        graph, dependencies = self._capture_info(stream)
        params = rt.cudaGraphNodeParams()
        params.type = rt.cudaGraphNodeType.cudaGraphNodeTypeConditional
        params.conditional.handle = handle
        params.conditional.type = kind
        params.conditional.size = 1
        edges = (None,) if _bindings_version() >= (13, 0) else ()  # 13.x: edge data after the dependencies
        node = _checked("cudaGraphAddNode", rt.cudaGraphAddNode(graph, dependencies, *edges, len(dependencies), params))
        body_graph = params.conditional.phGraph_out[0]
        _checked("cudaStreamUpdateCaptureDependencies", rt.cudaStreamUpdateCaptureDependencies(
            stream.cuda_stream, [node], *edges, 1, rt.cudaStreamUpdateCaptureDependenciesFlags.cudaStreamSetCaptureDependencies))
        self._depth += 1
        body_stream = self._body_stream(self._depth - 1)
        _checked("cudaStreamBeginCaptureToGraph", rt.cudaStreamBeginCaptureToGraph(
            body_stream.cuda_stream, body_graph, None, None, 0, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            with torch.cuda.stream(body_stream), torch.cuda.use_mem_pool(self._pools[self._depth - 1]):
                body()
        finally:
            self._depth -= 1
            _checked("cudaStreamEndCapture", rt.cudaStreamEndCapture(body_stream.cuda_stream))


def _runtime() -> Any:
    from cuda.bindings import runtime  # noqa: PLC0415

    return runtime


class _CudaReplay:
    """The instantiated graph and what it needs alive: the body pools and the condition flags."""

    def __init__(self, graph: torch.cuda.CUDAGraph, pools: list[Any], flags: list[torch.Tensor]):
        self.graph, self.pools, self.flags = graph, pools, flags

    def replay(self) -> None:
        self.graph.replay()


def make_backend(backend: str | ConditionalGraphs, device: torch.device) -> ConditionalGraphs:
    """``backend``: "fake", "cuda", "auto" (cuda on a CUDA device, fake elsewhere) or an instance."""
    if isinstance(backend, ConditionalGraphs):
        return backend
    if backend == "auto":
        backend = "cuda" if torch.device(device).type == "cuda" else "fake"
    if backend == "fake":
        return FakeConditionalGraphs()
    if backend == "cuda":
        return CudaConditionalGraphs()
    raise ValueError(f"backend must be 'fake', 'cuda', 'auto' or a ConditionalGraphs, got {backend!r}")


# --------------------------------------------------------------------------------- a whole adaptive trajectory

class ExitSegmentsLike(Protocol):
    """A model cut at its exits (:class:`diffrt.runtime.models.exits.ExitSegments` with ``graphs=False``):
    ``dit.embed(x, t, y) -> (h, c)``; ``run(k, h, c)`` -> (h, uncertainty [B]) for k < len(heads.depths),
    the prediction for the last segment; ``heads.predict(dit, k, h, c)`` -> exit k's prediction."""

    dit: Any
    heads: Any
    graphs: bool

    def run(self, k: int, h: torch.Tensor, c: torch.Tensor) -> Any: ...


@dataclass
class TrajectoryRunner:
    """Replays a captured trajectory: ``runner(noise, cond, uncond)`` copies the inputs into the static
    buffers, replays (no host sync) and returns a copy of the samples. ``ran`` [nodes] (int32, on the
    device) holds 1 where a conditional body ran in the latest replay, ``labels`` name the nodes."""

    replayable: Replayable
    noise: torch.Tensor
    conditions: tuple[torch.Tensor, ...]
    output: torch.Tensor
    ran: torch.Tensor
    labels: list[str]
    graphs: ConditionalGraphs

    def __call__(self, noise: torch.Tensor, cond: torch.Tensor | None = None,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
        if noise.shape != self.noise.shape:
            raise ValueError(f"the trajectory was captured for noise {tuple(self.noise.shape)}, got {tuple(noise.shape)}")
        self.noise.copy_(noise)
        for buffer, value in zip(self.conditions, (cond, uncond)):
            if value is not None:
                buffer.copy_(value)  # broadcast: one condition for all rows
        self.replayable.replay()
        return self.output.clone()

    def bodies_run(self) -> list[bool]:
        """Which conditional bodies ran in the latest replay (reads the device: call it outside timed loops)."""
        return [bool(v) for v in self.ran.tolist()]


def capture_adaptive_trajectory(sampler: Any, noise: torch.Tensor, cond: torch.Tensor,
                                uncond: torch.Tensor | None = None, backend: str | ConditionalGraphs = "auto",
                                segments: ExitSegmentsLike | None = None) -> TrajectoryRunner:
    """Capture every step of ``sampler``'s trajectory from ``noise`` [B, ...] as one graph of conditional nodes.

    The sampler (its public ``start`` / ``step`` / ``tables`` / ``plan``) has exactly one of:

    * ``adaptive_guidance`` (batch level): per step the conditional pass runs; an IF node "any row still
      guided" holds the unconditional pass of the whole batch (static shape) and the masked CFG combine
      (``uncond := guided ? uncond : cond``; a row stays guided while cos(cond, uncond) < threshold); when no
      row is guided the node is skipped and the step is the conditional-only one (uncond := cond);
    * ``early_exit`` with ``early_exit_scope="batch"`` and ``segments`` (``exit_segments(dit, graphs=False)``):
      per model call the first segment runs, then per exit k an IF node "not every row confident" (all
      uncertainties below the threshold) runs the blocks up to the next exit and that exit's prediction (or
      the rest of the model); the output is the prediction of the exit where the batch stopped. With a
      guidance scale the call is the CFG batch [uncond; cond] and the batch stops together.

    ``cond`` / ``uncond`` are tensors (class labels or embeddings), one row per sample or one for all.
    ``backend``: "auto" (CUDA conditional nodes on a CUDA device, the eager fake elsewhere), "fake", "cuda"
    or a :class:`ConditionalGraphs`. Returns the :class:`TrajectoryRunner` (already run once).
    """
    _check_sampler(sampler, cond, uncond, segments)
    batch, device = noise.shape[0], noise.device
    graphs = make_backend(backend, device)
    given = [c for c in (cond, uncond) if c is not None]
    conditions = tuple(torch.empty((batch, *c.shape[1:]), dtype=c.dtype, device=device).copy_(c) for c in given)
    nodes = sampler.plan.steps * (1 if segments is None else len(segments.heads.depths))
    trajectory = _Trajectory(sampler, graphs, noise.clone(), conditions, segments, nodes)
    replayable = graphs.capture(trajectory.program, device)
    return TrajectoryRunner(replayable, trajectory.noise, conditions, trajectory.output, trajectory.ran,
                            trajectory.labels, graphs)


def _check_sampler(sampler: Any, cond: Any, uncond: Any, segments: Any) -> None:
    guidance, exits = sampler.adaptive_guidance is not None, sampler.early_exit is not None
    if guidance == exits:
        raise ValueError("capture_adaptive_trajectory needs a sampler with exactly one of adaptive_guidance and "
                         f"early_exit (got adaptive_guidance={sampler.adaptive_guidance}, early_exit={sampler.early_exit})")
    if getattr(sampler, "linear_ag", None) is not None:
        raise NotImplementedError("linear_ag in a conditional-graph trajectory: not implemented")
    if not torch.is_tensor(cond) or (uncond is not None and not torch.is_tensor(uncond)):
        raise TypeError("a captured trajectory takes cond and uncond as tensors")
    if sampler.guidance_scale is not None and uncond is None:
        raise ValueError("the sampler has a guidance_scale: pass uncond (the unconditional conditioning)")
    if exits:
        if sampler.early_exit_scope != "batch":
            raise ValueError("a captured trajectory exits with the whole batch: use early_exit_scope='batch'")
        if segments is None or segments.graphs:
            raise ValueError("early exit needs segments=diffrt.runtime.models.exits.exit_segments(dit, graphs=False)")


class _Trajectory:
    """The program a backend captures: the sampling loop with its decisions as conditional nodes."""

    def __init__(self, sampler, graphs: ConditionalGraphs, noise: torch.Tensor, conditions: tuple[torch.Tensor, ...],
                 segments: ExitSegmentsLike | None, nodes: int):
        self.sampler, self.graphs, self.noise, self.segments = sampler, graphs, noise, segments
        self.cond, self.uncond = conditions[0], conditions[1] if len(conditions) > 1 else None
        self.output = torch.empty_like(noise)
        self.ran = torch.zeros(nodes, dtype=torch.int32, device=noise.device)
        self.labels: list[str] = []
        self.guided: torch.Tensor | None = None
        self.scales = sampler.plan.input_scales().tolist()

    def program(self) -> None:
        sampler, batch = self.sampler, self.noise.shape[0]
        self.ran.zero_()
        self.labels.clear()
        state = sampler.start(self.noise)
        self.guided = torch.ones(batch, dtype=torch.bool, device=self.noise.device)
        timesteps = sampler.tables(self.noise.device)[2]
        for i in range(sampler.plan.steps):
            x_in = state.x if self.scales[i] == 1.0 else state.x * self.scales[i]
            t = timesteps[i].expand(batch)
            if self.segments is None:
                out_cond, out_uncond = self._guidance_outputs(i, x_in, t)
            else:
                out_cond, out_uncond = self._exit_outputs(i, x_in, t)
            sampler.step(state, out_cond, out_uncond)
        self.output.copy_(state.x)

    def _if(self, flag: torch.Tensor, body: Callable[[], None], label: str) -> None:
        handle = self.graphs.handle()
        self.graphs.set_condition(handle, flag)
        self.labels.append(label)
        self.graphs.if_(handle, body, label)

    # adaptive guidance, batch level
    def _guidance_outputs(self, i: int, x_in: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_cond = self.sampler.denoiser(x_in, t, self.cond)
        out_uncond = out_cond.clone()  # the conditional-only step, unless the body runs
        self._if(self.guided.any(), functools.partial(self._unconditional_pass, i, x_in, t, out_cond, out_uncond),
                 f"step {i}: unconditional pass")
        return out_cond, out_uncond

    def _unconditional_pass(self, i, x_in, t, out_cond: torch.Tensor, out_uncond: torch.Tensor) -> None:
        predicted = self.sampler.denoiser(x_in, t, self.uncond)
        similar = torch.nn.functional.cosine_similarity(predicted.flatten(1).float(), out_cond.flatten(1).float(), dim=1)
        rows = self.guided.view(-1, *([1] * (out_cond.dim() - 1)))
        out_uncond.copy_(torch.where(rows, predicted, out_cond))
        self.guided.logical_and_(similar < self.sampler.adaptive_guidance)
        self.ran[i].fill_(1)

    # early exit, whole batch
    def _exit_outputs(self, i: int, x_in: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = self.sampler.denoiser.dtype
        x_in = x_in if dtype is None or x_in.dtype == dtype else x_in.to(dtype)
        if self.sampler.guidance_scale is None:
            return self._exit_prediction(i, x_in, t, self.cond), None
        out = self._exit_prediction(i, torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]))
        out_uncond, out_cond = out.chunk(2)
        return out_cond, out_uncond

    def _exit_prediction(self, i: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seg = self.segments
        h, c = seg.dit.embed(x, t, y)
        h, uncertainty = seg.run(0, h, c)
        out = seg.heads.predict(seg.dit, 0, h, c)
        stopped = (uncertainty < self.sampler.early_exit).all()
        exits = len(seg.heads.depths)
        for k in range(1, exits + 1):
            self._if(stopped.logical_not(), functools.partial(self._segment, i * exits + k - 1, k, h, c, out, stopped),
                     f"step {i}: blocks after exit {k}")
        return out

    def _segment(self, node: int, k: int, h: torch.Tensor, c: torch.Tensor, out: torch.Tensor,
                 stopped: torch.Tensor) -> None:
        """Segment k on the batch (in place: h, then out and stopped at the exit it reaches)."""
        seg = self.segments
        result = seg.run(k, h, c)
        if k == len(seg.heads.depths):
            out.copy_(result)
        else:
            h_next, uncertainty = result
            h.copy_(h_next)
            out.copy_(seg.heads.predict(seg.dit, k, h, c))
            stopped.copy_((uncertainty < self.sampler.early_exit).all())
        self.ran[node].fill_(1)
