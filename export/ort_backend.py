"""The ONNX Runtime backend: a Denoiser that runs an exported graph in an InferenceSession.

``OrtDenoiser(base, onnx_path)`` has ``base``'s schedule, sample shape and call signature, so the
Sampler runs it unchanged. It checks the graph and its external data file against the sha256 their
manifest (``<graph>.json``) records before ONNX Runtime reads them: a file with flipped bytes, cut
short or replaced is refused with a ValueError naming it, never run (an export written before
checksums loads with a warning). CPU tensors go through numpy (no copies where the layout allows); on a
GPU the CUDA execution provider reads and writes torch's buffers in place through I/O binding.
:func:`ort_denoiser` exports through the :class:`~diffrt.export.artifacts.ArtifactCache`: a graph
built for the same model, calibration, axes and opset is reused, anything else (other weights,
a corrupt file, a missing manifest) is rebuilt and the reason logged.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrt.runtime.denoiser import Denoiser

from .artifacts import ArtifactCache
from .calibration import Calibration, model_hash
from .onnx_export import FORMAT, OUTPUT, calibration_digest, export_onnx, load_manifest

log = logging.getLogger(__name__)

NUMPY = {"float32": np.float32, "int64": np.int64}


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort  # noqa: PLC0415

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("backend='onnxruntime' on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                               f"this onnxruntime has {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtDenoiser(Denoiser):
    """A Denoiser backed by an ONNX Runtime session over an :func:`export_onnx` graph."""

    def __init__(self, base: Denoiser, onnx_path: str | Path, device: torch.device | str | None = None,
                 calibration: Calibration | None = None, verify: bool = True):
        """``verify=False`` skips the sha256 check, for a caller that has just checked the files (the cache)."""
        import onnxruntime as ort  # noqa: PLC0415

        self.manifest = load_manifest(onnx_path, verify=verify)
        device = torch.device(device or "cpu")
        super().__init__(_NoModule(), base.schedule, sample_shape=base.sample_shape, dtype=torch.float32)
        self.device = device
        self.base = base
        self.calibration = calibration
        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=_providers(device))
        except Exception as error:  # noqa: BLE001 - ORT raises its own types for a corrupt file
            raise RuntimeError(f"ONNX Runtime cannot load {onnx_path}: {error}") from error
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        batch = x.shape[0]
        feeds = {"sample": x.float(), "timestep": torch.as_tensor(t, device=x.device).float().reshape(-1).expand(batch)}
        if "cond" in self.input_names:
            if cond is None:
                raise ValueError("this graph takes cond (class labels or embeddings)")
            dtype = torch.int64 if self.manifest["input_dtypes"]["cond"] == "int64" else torch.float32
            feeds["cond"] = torch.as_tensor(cond, device=x.device).to(dtype)
        if x.is_cuda:
            return self._run_cuda(feeds, x)
        arrays = {name: value.detach().contiguous().numpy() for name, value in feeds.items()}
        out = self.session.run([OUTPUT], arrays)[0]
        return torch.from_numpy(out).to(x.dtype)

    def _run_cuda(self, feeds: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        index = x.device.index or 0
        for name, value in feeds.items():
            value = value.contiguous()
            feeds[name] = value  # keep alive until the run
            binding.bind_input(name, "cuda", index, NUMPY[str(value.dtype).replace("torch.", "")],
                               list(value.shape), value.data_ptr())
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        binding.bind_output(OUTPUT, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out.to(x.dtype)

    def check_plan(self, plan) -> None:
        if self.calibration is not None:
            self.calibration.check_plan(plan)

    def __repr__(self) -> str:
        return f"OrtDenoiser({self.onnx_path}, providers={self.session.get_providers()})"


class _NoModule:
    """Stands in for the model: the graph holds it (Denoiser wants something callable)."""

    def __call__(self, *args: Any) -> None:
        raise RuntimeError("an OrtDenoiser runs its ONNX graph; call the denoiser, not its model")


def ort_denoiser(den: Denoiser, calibration: Calibration | None = None, cache: ArtifactCache | None = None,
                 device: torch.device | str | None = None, **export_options: Any) -> OrtDenoiser:
    """``den`` exported (or found in the cache) and loaded in ONNX Runtime."""
    cache = cache or ArtifactCache()
    base = getattr(den, "base", den)
    key = {"format": FORMAT, "model": type(base.model).__name__, "model_hash": model_hash(base.model),
           "calibration": calibration_digest(calibration), "todo": repr(getattr(getattr(den, "settings", None), "todo",
                                                                                  None)),
           "options": {k: repr(v) for k, v in sorted(export_options.items())}, "torch": torch.__version__}

    def validate(folder: Path) -> None:
        import onnx  # noqa: PLC0415

        onnx.checker.check_model(str(folder / "model.onnx"))
        manifest = load_manifest(folder / "model.onnx")
        if manifest["model_hash"] != key["model_hash"] or manifest["calibration"] != key["calibration"]:
            raise ValueError("the manifest names another model or calibration")

    folder = cache.lookup("onnx", key, validate)
    if folder is None:
        folder = cache.prepare("onnx", key)
        result = export_onnx(den, folder / "model.onnx", calibration=calibration, **export_options)
        cache.commit(folder, key, {"seconds": round(result.seconds, 2)})
    # lookup() / commit() have just checked / recorded every file's sha256: not hashed a second time
    return OrtDenoiser(base, folder / "model.onnx", device or base.device, calibration, verify=False)
