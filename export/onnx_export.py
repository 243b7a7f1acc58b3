"""``export_onnx(den, path, ...)``: a Denoiser as an ONNX graph, with or without its INT8 calibration.

The graph computes ``den(sample, timestep, cond) -> prediction``:

    sample     float32 [B, C, H, W]        timestep  float32 [B] (model timesteps)
    cond       int64 [B] (class labels) or float32 [B, L, D] (embeddings); absent for unconditional models
    prediction float32 [B, C, H, W]

Axes: the batch is dynamic unless ``batch`` is given; height and width are dynamic for UNets
(``resolution`` fixes them) and static for transformers, whose position embeddings fix the grid.
Opset 17 by default (the classic TorchScript exporter); weights past 2 GB go to one external
data file ``<name>.data`` beside the graph. ``onnx.checker`` runs on every export. ``simplify``
applies ONNX Runtime's basic offline graph optimizations (constant folding, redundant nodes) and
saves the result in place of the plain export.

**INT8** (``calibration``): every calibrated layer becomes QuantizeLinear / DequantizeLinear pairs
(weights per output channel, activations symmetric with zero point 0). Scales per timestep group:

* ``group=None`` (ONNX Runtime): one graph; the group of each sample is looked up in the graph
  from its timestep (nearest calibrated timestep) and the activation scale is gathered per sample
  (QuantizeLinear along the batch axis), as diffrt's own INT8 path does;
* ``group=g`` (TensorRT, which needs build-time constant scales): the graph of group g, its scales
  constants. A calibration with G groups exports G graphs (``export_groups``) that share the
  weights; a batch is run by the engine of its samples' group (batches mixing groups are split).

Attention options of an optimized denoiser go into the graph too where they are traceable (ToDo:
the strided or averaged K/V); block-sparse attention is not exported (it raises).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffrt.runtime import context

from . import quant
from .artifacts import file_sha256, read_json
from .calibration import Calibration, model_hash

log = logging.getLogger(__name__)

FORMAT = "diffrt-onnx/1"
INPUTS = ("sample", "timestep", "cond")
OUTPUT = "prediction"
EXTERNAL_DATA_BYTES = 1_800_000_000  # below ONNX's 2 GB protobuf limit, with room for the graph


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the graph, its external data (or None) and its manifest."""

    path: Path
    data_path: Path | None
    manifest: dict[str, Any]
    seconds: float


def calibration_digest(calibration: Calibration | None) -> str | None:
    """sha256 (16 hex) of a calibration's scales, smoothing, timesteps and groups (None: no calibration)."""
    if calibration is None:
        return None
    digest = hashlib.sha256(json.dumps([calibration.model_hash, calibration.timesteps, calibration.step_groups],
                                       default=str).encode())
    for name in sorted(calibration.scales):
        digest.update(name.encode() + calibration.scales[name].numpy().tobytes())
        if name in calibration.inv_smooth:
            digest.update(calibration.inv_smooth[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def example_cond(den, batch: int) -> torch.Tensor | None:
    """An example ``cond`` for tracing: class labels, or [B, 77, cross_attention_dim] embeddings, or None."""
    model = den.model
    config = getattr(model, "config", {}) or {}
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    if type(model).__name__ == "UNet2DConditionModel":
        return torch.zeros(batch, 77, int(get("cross_attention_dim")))
    if type(model).__name__ == "DigitsDiT" or get("num_class_embeds") or get("num_embeds_ada_norm"):
        return torch.zeros(batch, dtype=torch.int64)
    return None


class _Graph(nn.Module):
    """The traced function: the denoiser's call with diffrt's attention / QDQ contexts set."""

    def __init__(self, den, settings, weights: dict, calibration: Calibration | None, group: int | None):
        super().__init__()
        self.den, self.settings, self.weights, self.group = den, settings, weights, group
        self.model = den.model  # registered, so its parameters become initializers
        if calibration is not None:
            self.register_buffer("timesteps", torch.tensor(calibration.timesteps, dtype=torch.float32))
            self.register_buffer("groups", torch.tensor(calibration.step_groups, dtype=torch.int64))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        switches: dict[str, Any] = {}
        if self.settings is not None:
            switches["attention"] = (self.settings, tuple(sample.shape[-2:]))
        if self.weights:
            if self.group is None:
                nearest = (timestep[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)
                switches["int8"] = (self.groups[nearest], "qdq", self.weights)
            else:
                switches["int8"] = (self.group, "qdq-group", self.weights)
        with context.switches(**switches):
            return self.den._call(self.model, sample, timestep, cond).float()


def _attention_settings(den):
    settings = getattr(den, "settings", None)
    if settings is None:
        return None
    if settings.sparse is not None:
        raise NotImplementedError("block-sparse attention is not exported to ONNX; optimize without sparse=")
    from diffrt.runtime.attention import AttentionSettings  # noqa: PLC0415

    return AttentionSettings("torch", settings.todo, None)


def export_onnx(den, path: str | Path, batch: int | None = None, resolution: tuple[int, int] | None = None,
                calibration: Calibration | str | Path | None = None, group: int | None = None,
                cond: torch.Tensor | None = None, opset: int = 17, simplify: bool = False,
                dynamic_resolution: bool | None = None) -> ExportResult:
    """Export ``den`` (a Denoiser or OptimizedDenoiser, float32) to ``path`` (module docstring)."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or None (dynamic), got {batch!r}")
    if resolution is not None and not _positive_pair(resolution):
        raise ValueError(f"resolution must be (height, width), two positive integers, or None (the model's own), got "
                         f"{resolution!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise ValueError(f"opset must be a positive integer (17 by default), got {opset!r}")
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = den.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs an nn.Module model, got {type(model).__name__}")
    if den.dtype not in (None, torch.float32):
        raise TypeError(f"export_onnx exports float32 graphs (TensorRT picks fp16 / bf16 / int8 at build time); "
                        f"this denoiser computes in {den.dtype}")
    if isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    if calibration is None:
        calibration = getattr(den, "calibration", None)
    if calibration is not None:
        calibration.check_model(getattr(den, "base", den).model)
        if group is not None and not 0 <= group < calibration.groups:
            raise ValueError(f"group must be in 0..{calibration.groups - 1}, got {group}")
    weights = quant.install(model, calibration.layer_scales()) if calibration is not None else {}
    channels, height, width = den.sample_shape if resolution is None else (den.sample_shape[0], *resolution)
    if dynamic_resolution is None:
        dynamic_resolution = resolution is None and type(model).__name__.startswith("UNet")
    example_batch = 2 if batch is None else batch  # dynamic: not 1, a traced size-1 dim can be specialised away
    sample = torch.randn(example_batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((example_batch,), 500.0)
    cond = example_cond(den, example_batch) if cond is None else cond
    device = den.device or torch.device("cpu")
    args = [sample.to(device), timestep.to(device)] + ([] if cond is None else [cond.to(device)])
    names = list(INPUTS[:len(args)])
    axes: dict[str, dict[int, str]] = {}
    if batch is None:
        axes = {name: {0: "batch"} for name in names + [OUTPUT]}
    if dynamic_resolution:
        for name in ("sample", OUTPUT):
            axes.setdefault(name, {}).update({2: "height", 3: "width"})
    graph = _Graph(den, _attention_settings(den), weights, calibration, group).eval().requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape logic
        exported = Path(scratch) / "model.onnx"  # a model past 2 GB comes out as one file per tensor
        # with INT8, folding would turn the weights' Quantize / Dequantize pairs into float weights
        torch.onnx.export(graph, tuple(args), str(exported), dynamo=False, opset_version=opset, input_names=names,
                          output_names=[OUTPUT], dynamic_axes=axes or None, do_constant_folding=not weights)
        data_path = _finish(exported, path, simplify, int8_weights=bool(weights))
    manifest = {
        "format": FORMAT, "model": type(model).__name__, "model_hash": model_hash(getattr(den, "base", den).model),
        "calibration": calibration_digest(calibration), "group": group,
        "int8_scales": None if calibration is None else ("per-sample" if group is None else "constant"),
        "inputs": {n: [axes.get(n, {}).get(i, size) for i, size in enumerate(a.shape)] for n, a in zip(names, args)},
        "input_dtypes": {n: str(a.dtype).replace("torch.", "") for n, a in zip(names, args)},
        "output": [axes.get(OUTPUT, {}).get(i, size) for i, size in enumerate(sample.shape)],
        "opset": opset, "simplified": simplify, "todo": repr(getattr(getattr(den, "settings", None), "todo", None)),
        "torch": torch.__version__, "onnx": _version("onnx"), "created": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "data_file": None if data_path is None else data_path.name,
    }
    _write_manifest(path, manifest)
    seconds = time.perf_counter() - start
    log.info("exported %s (%s%s) in %.1f s", path, "int8 QDQ, " if calibration else "",
             "dynamic batch" if batch is None else f"batch {batch}", seconds)
    return ExportResult(path, data_path, manifest, seconds)


def export_groups(den, folder: str | Path, calibration: Calibration, **options) -> list[ExportResult]:
    """One graph per timestep group of ``calibration`` (constant scales, for TensorRT) in ``folder``,
    ``group<g>.onnx``, all reading their weights from one shared ``weights.data`` (only the scales differ)."""
    folder = Path(folder)
    results = [export_onnx(den, folder / f"group{g}.onnx", calibration=calibration, group=g, **options)
               for g in range(calibration.groups)]
    share_weights([r.path for r in results], folder / "weights.data")
    for result in results:
        result.data_path = folder / "weights.data"
        result.manifest["data_file"] = "weights.data"
        _write_manifest(result.path, result.manifest)
    return results


def _positive_pair(value: Any) -> bool:
    """Whether ``value`` is (height, width): a tuple or list of two positive integers."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and \
        all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``<graph>.json`` last, with the sha256 of the graph and of its external data file."""
    files = [path.name] + ([manifest["data_file"]] if manifest.get("data_file") else [])
    manifest["sha256"] = {name: file_sha256(path.parent / name) for name in files}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")


def share_weights(paths: list[Path], data_path: Path, threshold: int = 1024) -> None:
    """Rewrite graphs that hold the same weights so that all read them from one external file.

    Initializers of at least ``threshold`` bytes go to ``data_path`` once (from the first graph); in
    the others, an initializer with the same name and bytes points at the same offset; anything
    that differs stays in its graph.
    """
    import onnx  # noqa: PLC0415
    from onnx import external_data_helper  # noqa: PLC0415

    first = onnx.load(str(paths[0]), load_external_data=True)
    external_data_helper.convert_model_to_external_data(first, all_tensors_to_one_file=True,
                                                        location=data_path.name, size_threshold=threshold)
    onnx.save_model(first, str(paths[0]))
    first = onnx.load(str(paths[0]), load_external_data=False)
    shared = {init.name: init for init in first.graph.initializer
              if init.data_location == onnx.TensorProto.EXTERNAL}
    data = data_path.read_bytes()
    for path in paths[1:]:
        model = onnx.load(str(path), load_external_data=True)
        for init in model.graph.initializer:
            entry = shared.get(init.name)
            if entry is None:
                continue
            info = {e.key: e.value for e in entry.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if init.raw_data != data[offset:offset + length]:
                continue
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.extend(entry.external_data)
        for stale in path.parent.glob(f"{path.stem}.data"):
            stale.unlink()
        onnx.save_model(model, str(path))
    for path in paths:
        onnx.checker.check_model(str(path))


def store_int8_weights(model) -> int:
    """Give every quantized layer's weight a DequantizeLinear of int8 codes: the standard QDQ form (int8
    weights on disk; what TensorRT maps to INT8 GEMMs). Returns how many weights were stored as int8.

    The tracer folds the weights' own quantize / dequantize pair into a float constant, so the weights
    are found back here: a MatMul / Gemm whose activation input comes from a DequantizeLinear and whose
    weight is a constant (or a Transpose of one) made of exact multiples of a per-output-channel scale
    (the int8 codes times their scale, as the W8A8 layer dequantizes them).
    """
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # without constant folding, traced constants are Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}
    stored = 0
    for node in list(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or getattr(producers.get(node.input[0]), "op_type", None) != \
                "DequantizeLinear":
            continue
        holder, slot = node, 1  # the node whose input `slot` carries the weight constant
        transpose = producers.get(node.input[1])
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in constants:
            holder, slot = transpose, 0
        name = holder.input[slot]
        if name not in constants or constants[name].ndim != 2:
            continue
        weight = constants[name].astype(np.float32)
        out_axis = 0 if holder is transpose or any(a.name == "transB" and a.i for a in node.attribute) else 1
        scale = np.abs(weight).max(axis=1 - out_axis) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        shaped = scale[:, None] if out_axis == 0 else scale[None, :]
        codes = np.rint(weight / shaped)
        if np.abs(codes * shaped - weight).max() > 1e-5 * max(float(np.abs(weight).max()), 1e-30):
            continue  # not the dequantized int8 weight of a W8A8 layer
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(codes, -127, 127).astype(np.int8), f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero")])
        dequantize = helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                      [f"{name}_dequantized"], name=f"{name}/DequantizeLinear", axis=out_axis)
        graph.node.insert(list(graph.node).index(holder), dequantize)
        holder.input[slot] = f"{name}_dequantized"
        stored += 1
    _drop_unused(graph)
    return stored


def _drop_unused(graph) -> None:
    """Remove Constant nodes and initializers no node reads any more (the float weights replaced by int8)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if node.op_type == "Constant" and node.output[0] not in used]
        for node in dead:
            graph.node.remove(node)
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
        if not dead and not unused:
            return


def _finish(exported: Path, path: Path, simplify: bool, int8_weights: bool = False) -> Path | None:
    """Save the export at ``path`` (weights past 2 GB in one external data file), check it, optionally
    simplify it; returns the data file's path or None."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(exported), load_external_data=True)
    if int8_weights:
        log.info("stored %d weights as int8", store_int8_weights(model))
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data_name = f"{path.stem}.data"
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=data_name)
    onnx.checker.check_model(str(path))
    if simplify:
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        simplified = path.with_suffix(".simplified.onnx")
        options.optimized_model_filepath = str(simplified)
        if large:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{path.stem}.simplified.data")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        simplified.replace(path)
        if large:
            (path.parent / f"{path.stem}.simplified.data").replace(path.parent / data_name)
        onnx.checker.check_model(str(path))
    return path.parent / data_name if large else None


def _version(package: str) -> str | None:
    try:
        import importlib.metadata  # noqa: PLC0415

        return importlib.metadata.version(package)
    except Exception:  # noqa: BLE001
        return None


def load_manifest(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """The manifest written beside an export (``<graph>.json``); raises with the file named if it is missing
    or malformed. ``verify``: also check the graph's and its data file's sha256 (ValueError naming the file)."""
    manifest_path = Path(path).with_suffix(".json")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: this ONNX file was not exported by diffrt.export_onnx")
    document = read_json(manifest_path)
    if document.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a diffrt ONNX manifest ({FORMAT})")
    if verify:
        verify_export(Path(path), document)
    return document


def verify_export(path: Path, manifest: dict[str, Any]) -> None:
    """Check the files of the export at ``path`` against the sha256 its manifest records."""
    recorded = manifest.get("sha256")
    if recorded is None:
        log.warning("%s: the manifest carries no checksums (exported by an older diffrt): not verified", path)
        return
    if not isinstance(recorded, dict):
        raise ValueError(f"{path.with_suffix('.json')}: 'sha256' must map file names to checksums")
    for name, expected in recorded.items():
        file = path.parent / name
        if not file.is_file():
            raise ValueError(f"{file} is missing (named by {path.with_suffix('.json')})")
        if file_sha256(file) != expected:
            raise ValueError(f"{file} does not match the sha256 in {path.with_suffix('.json')} (corrupt or modified)")
