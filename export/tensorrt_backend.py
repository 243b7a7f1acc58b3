"""The TensorRT backend: engines built from diffrt's ONNX exports, cached on disk, run with or without torch.

TensorRT is imported on first use (:func:`tensorrt`), never at import time; without it the error
says how to install it. Written against TensorRT 10's Python API (``build_serialized_network``,
named I/O tensors, ``execute_async_v3``).

* :func:`build_engine`: an ONNX graph -> a serialized engine: fp16 / bf16 / fp32 (INT8 comes from
  the graph's QDQ nodes: explicit quantization, no calibrator), one optimization profile per
  :class:`Profile` (batch and resolution ranges; static where min = max), a timing cache file
  shared by all builds of the cache folder. The timing cache carries a sha256 (``timing.cache.sha256``,
  written after it): a timing cache whose bytes do not match, or that has no checksum, is discarded
  with a log line and the build starts from an empty one (:func:`read_timing_cache`), never used.
* :func:`engine_key`: what an engine depends on (GPU name and compute capability, TensorRT
  version, model and calibration hashes, timestep group, profiles, precision, the ONNX manifest);
  the :class:`~diffrt.export.artifacts.ArtifactCache` keys engines by it and checks the sha256 of
  the engine (and of the ONNX graph it was built from) before reuse, so a mismatched or corrupt
  engine is rebuilt, never reused.
* :class:`TrtEngine` runs an engine on torch tensors on the current stream; with ``cuda_graphs``
  and a shape seen before, the launch is one CUDA-graph replay (static input / output buffers).
* :class:`TorchFreeEngine` runs an engine with device buffers, a stream and events from
  cuda-python (an engine served without torch: numpy in, numpy out).
* :class:`TrtDenoiser` / :func:`trt_denoiser`: the Denoiser. With an INT8 calibration TensorRT
  needs constant scales, so there is one engine per timestep group (graphs from
  :func:`~diffrt.export.onnx_export.export_groups`); the samples of a batch are routed to their
  group's engine (a batch mixing groups is split, run per group, and put back in order).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrt.runtime.denoiser import Denoiser

from .artifacts import ArtifactCache
from .calibration import Calibration, model_hash
from .onnx_export import OUTPUT, calibration_digest, export_onnx, load_manifest

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed. On a Linux machine with an NVIDIA GPU: `pip install tensorrt` "
                "(NVIDIA's wheels for CUDA 12 / 13; `pip install tensorrt-cu12` pins CUDA 12), or use NVIDIA's "
                "TensorRT container. backend='onnxruntime' needs no TensorRT.")
PRECISIONS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def tensorrt():
    """The ``tensorrt`` module, imported now; ImportError with :data:`INSTALL_HINT` when it is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return trt


@dataclass(frozen=True)
class Profile:
    """One optimization profile: batch (min, opt, max) and, for dynamic-resolution graphs, (height, width)
    min / opt / max; a static graph's axes are taken from its manifest."""

    batch: tuple[int, int, int] = (1, 2, 8)
    resolution: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        low, opt, high = self.batch
        if not 1 <= low <= opt <= high:
            raise ValueError(f"Profile: batch must be (min, opt, max) with 1 <= min <= opt <= max, got {self.batch}")
        if self.resolution is not None:
            (h0, w0), (h1, w1), (h2, w2) = self.resolution
            if not (h0 <= h1 <= h2 and w0 <= w1 <= w2):
                raise ValueError(f"Profile: resolution must grow from min to opt to max, got {self.resolution}")

    def shapes(self, manifest: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input: (min shape, opt shape, max shape)} for the graph described by ``manifest``."""
        out = {}
        for name, dims in manifest["inputs"].items():
            triple = []
            for which in range(3):
                shape = []
                for axis, dim in enumerate(dims):
                    if dim == "batch":
                        shape.append(self.batch[which])
                    elif dim in ("height", "width"):
                        if self.resolution is None:
                            raise ValueError(f"the graph's {name} has a dynamic {dim}: give Profile(resolution=...)")
                        shape.append(self.resolution[which][0 if dim == "height" else 1])
                    elif isinstance(dim, str):
                        raise ValueError(f"the graph's {name} axis {axis} is dynamic ({dim}); profiles cover batch, "
                                         "height and width")
                    else:
                        shape.append(int(dim))
                triple.append(tuple(shape))
            out[name] = tuple(triple)
        return out


def gpu_identity(device: torch.device | None = None) -> dict[str, Any]:
    """GPU name and compute capability (engines are specific to both)."""
    index = (device.index if device is not None and device.index is not None else torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def engine_key(manifest: dict[str, Any], precision: str, profiles: list[Profile], gpu: dict[str, Any],
               trt_version: str) -> dict[str, Any]:
    """What an engine depends on (module docstring)."""
    return {"kind": "tensorrt-engine", **gpu, "tensorrt": trt_version, "model_hash": manifest["model_hash"],
            "calibration": manifest["calibration"], "group": manifest["group"], "precision": precision,
            "profiles": [[list(p.batch), None if p.resolution is None else [list(r) for r in p.resolution]]
                         for p in profiles],
            "inputs": manifest["inputs"], "opset": manifest["opset"], "todo": manifest.get("todo")}


def build_engine(onnx_path: str | Path, precision: str, profiles: list[Profile], timing_cache: Path | None = None,
                 workspace: int = 8 << 30) -> bytes:
    """A serialized engine of the graph at ``onnx_path`` (module docstring)."""
    trt = tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    manifest = load_manifest(onnx_path)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if manifest["int8_scales"] is not None:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the graph's QDQ nodes give the scales
    cache = config.create_timing_cache(read_timing_cache(timing_cache) if timing_cache is not None else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(manifest).items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    if timing_cache is not None:
        write_timing_cache(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def _checksum_path(timing_cache: Path) -> Path:
    return timing_cache.with_name(timing_cache.name + ".sha256")


def write_timing_cache(path: Path, data: bytes) -> None:
    """Write a timing cache, then its sha256 (last: a write cut short leaves a cache that does not match)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _checksum_path(path).unlink(missing_ok=True)
    path.write_bytes(data)
    _checksum_path(path).write_text(hashlib.sha256(data).hexdigest() + "\n")


def read_timing_cache(path: Path) -> bytes:
    """The timing cache's bytes when they match the sha256 written beside them; otherwise (no checksum, another
    checksum: corrupt, truncated or written by something else) both files are removed with a log line and the
    answer is empty (TensorRT then starts a new timing cache). No file yet: empty, silently."""
    checksum = _checksum_path(path)
    if not path.is_file():
        checksum.unlink(missing_ok=True)
        return b""
    data = path.read_bytes()
    recorded = checksum.read_text().strip() if checksum.is_file() else None
    if recorded is not None and recorded == hashlib.sha256(data).hexdigest():
        return data
    why = "has no checksum" if recorded is None else "does not match its sha256 (corrupt or truncated)"
    log.warning("TensorRT timing cache %s %s: discarded, the build starts a new one", path, why)
    path.unlink()
    checksum.unlink(missing_ok=True)
    return b""


class TrtEngine:
    """An engine run on torch tensors (CUDA), on the current stream; optional CUDA-graph replays."""

    def __init__(self, engine_bytes: bytes, cuda_graphs: bool = False):
        trt = tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (corrupt, or built by another version)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _launch(self, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, value in feeds.items():
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: value.contiguous() for name, value in feeds.items()}
        for name, value in feeds.items():
            self.context.set_input_shape(name, tuple(value.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device="cuda")
        if not self.cuda_graphs:
            self._launch(feeds, out)
            return out
        key = tuple((name, tuple(value.shape), value.dtype) for name, value in feeds.items())
        if key not in self._graphs:
            static = {name: value.clone() for name, value in feeds.items()}
            static_out = torch.empty_like(out)
            self._launch(static, static_out)  # TensorRT allocates its resources before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._launch(static, static_out)
            self._graphs[key] = (graph, static, static_out)
        graph, static, static_out = self._graphs[key]
        for name, value in feeds.items():
            static[name].copy_(value)
        graph.replay()
        return static_out.clone()


class TorchFreeEngine:
    """An engine served without torch: numpy arrays in and out, buffers / stream / events from cuda-python.

    Buffers are allocated once for the largest shapes of the engine's first profile.
    """

    def __init__(self, engine_bytes: bytes):
        import numpy as np  # noqa: PLC0415

        trt = tensorrt()
        self.cudart = _cudart()
        self.np = np
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.done = _check(self.cudart.cudaEventCreate())
        largest = {}  # name -> bytes at the first profile's largest shape; the output has the sample's
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if name == OUTPUT:
                continue
            shape = self.engine.get_tensor_profile_shape(name, 0)[2]
            largest[name] = int(np.prod(shape)) * np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
        largest[OUTPUT] = largest["sample"]
        self.buffers = {name: (_check(self.cudart.cudaMalloc(size)), size) for name, size in largest.items()}

    def infer(self, feeds: dict[str, Any]) -> Any:
        """feeds: numpy arrays by input name -> the prediction (numpy float32)."""
        np, cudart = self.np, self.cudart
        kind_h2d, kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            pointer, size = self.buffers[name]
            if array.nbytes > size:
                raise ValueError(f"{name}: {array.shape} is larger than the engine's profile allows")
            _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind_h2d, self.stream))
            self.context.set_input_shape(name, array.shape)
            self.context.set_tensor_address(name, pointer)
        out = np.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=np.float32)
        self.context.set_tensor_address(OUTPUT, self.buffers[OUTPUT][0])
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[OUTPUT][0], out.nbytes, kind_d2h, self.stream))
        _check(cudart.cudaEventRecord(self.done, self.stream))
        _check(cudart.cudaEventSynchronize(self.done))
        return out

    def close(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.cudart.cudaEventDestroy(self.done)
        self.cudart.cudaStreamDestroy(self.stream)
        self.buffers = {}


def _cudart():
    try:
        from cuda.bindings import runtime  # noqa: PLC0415 - cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # noqa: PLC0415 - older cuda-python
        except ImportError as error:
            raise ImportError("serving an engine without torch needs cuda-python: `pip install cuda-python`") from error
    return runtime


def _check(result):
    """cuda-python returns (error, value...): raise on an error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA runtime error {error}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


class TrtDenoiser(Denoiser):
    """A Denoiser backed by TensorRT engines: one, or one per timestep group with INT8 (module docstring)."""

    def __init__(self, base: Denoiser, engines: list[TrtEngine], manifest: dict[str, Any],
                 calibration: Calibration | None = None):
        super().__init__(_EngineModule(), base.schedule, sample_shape=base.sample_shape, dtype=torch.float32)
        self.device = torch.device("cuda")
        self.base, self.engines, self.manifest, self.calibration = base, engines, manifest, calibration

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(batch)
        feeds = {"sample": x.float(), "timestep": t}
        if "cond" in self.manifest["inputs"]:
            dtype = torch.int64 if self.manifest["input_dtypes"]["cond"] == "int64" else torch.float32
            feeds["cond"] = torch.as_tensor(cond, device=x.device).to(dtype)
        if len(self.engines) == 1:
            return self.engines[0].run(feeds).to(x.dtype)
        groups = self.calibration.groups_of(t).tolist()  # the host picks the engines: one sync per call
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for group in sorted(set(groups)):
            rows = torch.tensor([i for i, g in enumerate(groups) if g == group], device=x.device)
            out[rows] = self.engines[group].run({name: value.index_select(0, rows) for name, value in feeds.items()})
        return out.to(x.dtype)

    def check_plan(self, plan) -> None:
        if self.calibration is not None:
            self.calibration.check_plan(plan)


class _EngineModule:
    def __call__(self, *args: Any) -> None:
        raise RuntimeError("a TrtDenoiser runs TensorRT engines; call the denoiser, not its model")


def trt_denoiser(den, calibration: Calibration | None = None, precision: torch.dtype = torch.float16,
                 cache: ArtifactCache | None = None, profiles: list[Profile] | None = None,
                 batch_range: tuple[int, int, int] = (1, 2, 8), resolution_range=None, workspace: int = 8 << 30,
                 cuda_graphs: bool = True) -> TrtDenoiser:
    """``den`` as TensorRT engines, built once and cached (module docstring)."""
    trt = tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("backend='tensorrt' needs a CUDA GPU")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(str, PRECISIONS))}, got {precision}")
    cache = cache or ArtifactCache()
    profiles = profiles or [Profile(batch_range, resolution_range)]
    base = getattr(den, "base", den)
    onnx_key = {"model_hash": model_hash(base.model), "calibration": calibration_digest(calibration),
                "todo": repr(getattr(getattr(den, "settings", None), "todo", None)), "torch": torch.__version__,
                "dynamic_resolution": any(p.resolution is not None for p in profiles)}
    groups = [None] if calibration is None else list(range(calibration.groups))
    engines, manifest = [], None
    for group in groups:
        graph_key = {**onnx_key, "group": group, "kind": "onnx-for-tensorrt"}
        folder = cache.lookup("onnx", graph_key, lambda f: load_manifest(f / "model.onnx"))
        if folder is None:
            folder = cache.prepare("onnx", graph_key)
            export_onnx(den, folder / "model.onnx", calibration=calibration, group=group,
                        dynamic_resolution=graph_key["dynamic_resolution"])
            cache.commit(folder, graph_key)
        manifest = load_manifest(folder / "model.onnx")
        key = engine_key(manifest, PRECISIONS[precision], profiles, gpu_identity(), trt.__version__)
        engines.append(TrtEngine(_engine_bytes(cache, key, folder / "model.onnx", profiles, workspace), cuda_graphs))
    return TrtDenoiser(base, engines, manifest, calibration)


def _engine_bytes(cache: ArtifactCache, key: dict, onnx_path: Path, profiles: list[Profile], workspace: int) -> bytes:
    """The cached engine for ``key`` (its sha256 checked by the cache against the manifest), or a new build."""
    def validate(folder: Path) -> None:
        if (folder / "engine.plan").stat().st_size == 0:
            raise ValueError("engine.plan is empty")

    folder = cache.lookup("tensorrt", key, validate)
    if folder is not None:
        return (folder / "engine.plan").read_bytes()
    folder = cache.prepare("tensorrt", key)
    log.info("building a TensorRT engine (%s) from %s", key["precision"], onnx_path)
    data = build_engine(onnx_path, key["precision"], profiles, cache.root / "tensorrt" / "timing.cache", workspace)
    (folder / "engine.plan").write_bytes(data)
    cache.commit(folder, key, {"bytes": len(data)})  # the manifest records engine.plan's sha256
    return data
