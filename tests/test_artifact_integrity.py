"""Integrity of every artifact: fault injection per kind (flipped bytes, truncation, NaN / zero / negative
values, wrong types, unknown keys, non-UTF-8 bytes, deeply nested JSON). A cache entry (ONNX graph,
external weights, TensorRT engine) is rebuilt and the reason logged; a user file (calibration,
acceleration config) is refused with a ValueError naming the file. The next good load still works."""
from __future__ import annotations

import json
import logging
import math
import struct

import pytest
import torch
from diffrt.export import Calibration, calibrate, export_onnx
from diffrt.export import onnx_export
from diffrt.export import tensorrt_backend as trt_backend
from diffrt.export.artifacts import MANIFEST, ArtifactCache
from diffrt.export.onnx_export import load_manifest
from diffrt.runtime import models
from diffrt.runtime.acceleration import Acceleration

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from diffrt.export.ort_backend import OrtDenoiser, ort_denoiser  # noqa: E402

LABELS = torch.arange(4)
NULL = torch.tensor([models.NULL_CLASS])
DEEP = "[" * 100_000 + "]" * 100_000  # past json's recursion limit
CACHE_LOG = "diffrt.export.artifacts"


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


@pytest.fixture(scope="module")
def calibration(dit):
    return calibrate(dit, "dpmpp-2m", 3, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="steps",
                     method="max", progress=False)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _matches(den, reference) -> bool:
    x, t, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0]), \
        torch.tensor([1, 2])
    with torch.no_grad():
        return _rel(den(x, t, y), reference(x, t, y)) <= 1e-4


def _weight_offset(path, data_path=None) -> tuple:
    """(file, byte offset) of the largest float weight's bytes, in the graph or its external data file."""
    model = onnx.load(str(path), load_external_data=True)
    init = max(model.graph.initializer, key=lambda i: len(i.raw_data))
    file = data_path or path
    offset = file.read_bytes().find(init.raw_data)
    assert offset >= 0
    return file, offset + len(init.raw_data) // 2


def _overwrite(file, offset: int, data: bytes) -> None:
    content = bytearray(file.read_bytes())
    content[offset:offset + len(data)] = data
    file.write_bytes(bytes(content))


def _flip(file, offset: int) -> None:
    _overwrite(file, offset, bytes([file.read_bytes()[offset] ^ 0x40]))


def _truncate(file, offset: int) -> None:
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])


def _nan(file, offset: int) -> None:
    _overwrite(file, offset - offset % 4, struct.pack("<f", math.nan))


# ------------------------------------------------------------------ cache entries: ONNX graphs and weights


@pytest.mark.parametrize("fault", [_flip, _truncate, _nan])
def test_a_damaged_cached_graph_is_rebuilt_and_said_so(dit, tmp_path, caplog, fault):
    cache = ArtifactCache(tmp_path)
    first = ort_denoiser(dit, cache=cache)
    fault(*_weight_offset(first.onnx_path))
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        rebuilt = ort_denoiser(dit, cache=cache)
    assert "model.onnx does not match its sha256" in caplog.text and "rebuilding" in caplog.text
    assert _matches(rebuilt, dit)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=CACHE_LOG):
        again = ort_denoiser(dit, cache=cache)  # the rebuilt entry is reused as is
    assert not caplog.text and _matches(again, dit)


def test_damaged_external_weights_are_rebuilt(dit, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # every export gets its weights file
    cache = ArtifactCache(tmp_path)
    first = ort_denoiser(dit, cache=cache)
    data_path = first.onnx_path.with_name("model.data")
    assert data_path.is_file()
    _nan(*_weight_offset(first.onnx_path, data_path))
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        rebuilt = ort_denoiser(dit, cache=cache)
    assert "model.data does not match its sha256" in caplog.text
    assert _matches(rebuilt, dit)
    data_path.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        assert _matches(ort_denoiser(dit, cache=cache), dit)
    assert "model.data is missing" in caplog.text


@pytest.mark.parametrize("manifest", [b"\xff\xfe not utf-8", DEEP.encode(), b"[1, 2]", b'{"key": {}}',
                                      "no checksums"])
def test_a_malformed_or_old_manifest_means_a_rebuild(dit, tmp_path, caplog, manifest):
    cache = ArtifactCache(tmp_path)
    first = ort_denoiser(dit, cache=cache)
    path = first.onnx_path.parent / MANIFEST
    if manifest == "no checksums":  # an entry committed before checksums were recorded
        document = json.loads(path.read_text())
        del document["files"]
        manifest = json.dumps(document).encode()
    path.write_bytes(manifest)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        rebuilt = ort_denoiser(dit, cache=cache)
    assert "rebuilding" in caplog.text and _matches(rebuilt, dit)
    assert "files" in json.loads(path.read_text())


def test_a_damaged_engine_is_rebuilt(tmp_path, monkeypatch, caplog):
    builds = []
    monkeypatch.setattr(trt_backend, "build_engine", lambda *args: builds.append(1) or f"engine-{len(builds)}".encode())
    manifest = {"model_hash": "abc", "calibration": None, "group": None, "opset": 17, "todo": "None",
                "inputs": {"sample": ["batch", 1, 16, 16]}}
    key = trt_backend.engine_key(manifest, "fp16", [trt_backend.Profile()], {"gpu": "g", "compute_capability": "9.0"},
                                 "10.9.0")
    cache = ArtifactCache(tmp_path)
    assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-1"
    plan = cache.folder("tensorrt", key) / "engine.plan"
    plan.write_bytes(b"engine-2")  # same length, other bytes
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-2"
    assert "engine.plan does not match its sha256" in caplog.text and len(builds) == 2
    assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-2" and len(builds) == 2


def test_a_standalone_export_verifies_on_request(dit, tmp_path):
    path = export_onnx(dit, tmp_path / "dit.onnx").path
    assert set(load_manifest(path, verify=True)["sha256"]) == {"dit.onnx"}
    _flip(*_weight_offset(path))
    load_manifest(path)  # without verify: only the manifest is read
    with pytest.raises(ValueError, match="dit.onnx does not match the sha256 in .*dit.json"):
        load_manifest(path, verify=True)
    (tmp_path / "dit.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="dit.json: not UTF-8"):
        load_manifest(path)


@pytest.mark.parametrize("fault", [_flip, _truncate, _nan])
def test_ort_denoiser_refuses_a_damaged_export_by_name(dit, tmp_path, fault):
    """Loading a standalone export directly checks its sha256 as the cache does: never run, the file named."""
    path = export_onnx(dit, tmp_path / "dit.onnx").path
    assert _matches(OrtDenoiser(dit, path), dit)
    fault(*_weight_offset(path))
    with pytest.raises(ValueError, match=r"dit\.onnx does not match the sha256 in .*dit\.json"):
        OrtDenoiser(dit, path)


def test_ort_denoiser_refuses_damaged_external_weights_by_name(dit, calibration, tmp_path):
    results = onnx_export.export_groups(dit, tmp_path / "groups", calibration)
    graph, data = results[0].path, results[0].data_path
    assert OrtDenoiser(dit, graph, calibration=calibration).manifest["data_file"] == "weights.data"
    _flip(*_weight_offset(graph, data))
    with pytest.raises(ValueError, match=r"weights\.data does not match the sha256 in .*group0\.json"):
        OrtDenoiser(dit, graph, calibration=calibration)
    data.unlink()
    with pytest.raises(ValueError, match=r"weights\.data is missing"):
        OrtDenoiser(dit, graph, calibration=calibration)


# ------------------------------------------------------------------ user files: calibrations


def _same(a: Calibration, b: Calibration) -> bool:
    return (a.model_hash, a.timesteps, a.step_groups, a.meta) == (b.model_hash, b.timesteps, b.step_groups, b.meta) \
        and set(a.scales) == set(b.scales) and all(torch.equal(a.scales[n], s) for n, s in b.scales.items())


def _saved(calibration, tmp_path, name="cal"):
    calibration.save(tmp_path / name)
    return tmp_path / name


def _unchecked(base, edit) -> None:
    """Edit the JSON of a saved calibration and drop its checksum (as a file from an older diffrt)."""
    path = base.with_suffix(".json")
    document = json.loads(path.read_text())
    del document["sha256"]
    edit(document)
    path.write_text(json.dumps(document))


def _rewrite_scales(calibration, tmp_path, value: float):
    layer = sorted(calibration.scales)[0]
    scales = {**calibration.scales, layer: calibration.scales[layer].clone().fill_(value)}
    bad = Calibration(calibration.model_hash, calibration.timesteps, calibration.step_groups, scales,
                      calibration.inv_smooth, calibration.meta)
    return _saved(bad, tmp_path, "bad"), layer


def test_a_good_calibration_round_trips_and_without_checksum_warns(dit, calibration, tmp_path, caplog):
    base = _saved(calibration, tmp_path)
    loaded = Calibration.load(base)
    assert _same(loaded, calibration) and loaded.source == base.with_suffix(".json")
    loaded.check_model(dit.model)
    _unchecked(base, lambda document: None)
    with caplog.at_level(logging.WARNING, logger="diffrt.export.calibration"):
        assert _same(Calibration.load(base), calibration)
    assert "carries no checksum" in caplog.text


@pytest.mark.parametrize("value", [math.nan, 0.0, -0.01, math.inf])
def test_scales_must_be_finite_and_positive(calibration, tmp_path, value):
    base, layer = _rewrite_scales(calibration, tmp_path, value)
    with pytest.raises(ValueError, match=rf"bad\.safetensors: '{layer}.scales' holds values that are not finite"):
        Calibration.load(base)
    assert _same(Calibration.load(_saved(calibration, tmp_path)), calibration)  # the next good load


@pytest.mark.parametrize("fault", ["flip", "truncate", "nan", "json-edit"])
def test_damaged_calibration_files_are_refused_by_name(calibration, tmp_path, fault):
    base = _saved(calibration, tmp_path)
    weights, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    if fault == "json-edit":
        json_path.write_text(json_path.read_text().replace('"step_groups": [\n  0,\n  1,', '"step_groups": [\n  0,\n  0,'))
        match = "cal.json does not match its sha256"
    else:
        end = len(weights.read_bytes()) - 4  # the last scale's bytes
        {"flip": _flip, "truncate": _truncate, "nan": _nan}[fault](weights, end)
        match = "cal.safetensors does not match the sha256 recorded in .*cal.json"
    with pytest.raises(ValueError, match=match):
        Calibration.load(base)
    if fault in ("truncate", "nan"):  # without checksums the values are still checked
        _unchecked(base, lambda document: None)
        with pytest.raises(ValueError, match="cal.safetensors: "):
            Calibration.load(base)
    assert _same(Calibration.load(_saved(calibration, tmp_path)), calibration)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("layers"), "'layers' must be a list"),
    (lambda d: d.update(timesteps="abc"), "'timesteps' must be"),
    (lambda d: d.update(timesteps=[math.nan, 1.0, 2.0]), "'timesteps' must be"),
    (lambda d: d.update(step_groups=[0.0, 1.0, 2.0]), "'step_groups' must be"),
    (lambda d: d.update(step_groups=[0, 2, 2]), "number the groups"),
    (lambda d: d.update(model_hash=7), "'model_hash' must be"),
    (lambda d: d.update(smoothed=["no.such.layer"]), "'smoothed' names layers"),
    (lambda d: d.update(layers=d["layers"] + ["blocks.9.mlp.0"]), "no tensor 'blocks.9.mlp.0.scales'"),
    (lambda d: d.update(step_groups=[0, 1, 1]), "length 2 \\(one per timestep group\\)"),
])
def test_calibration_schema_errors_name_the_file(calibration, tmp_path, edit, message):
    base = _saved(calibration, tmp_path)
    _unchecked(base, edit)
    with pytest.raises(ValueError, match=rf"cal\.(json|safetensors): .*{message}"):
        Calibration.load(base)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", DEEP.encode(), b"[]", b'{"format": '])
def test_malformed_calibration_json_names_the_file(calibration, tmp_path, content):
    base = _saved(calibration, tmp_path)
    base.with_suffix(".json").write_bytes(content)
    with pytest.raises(ValueError, match=r"cal\.json: "):
        Calibration.load(base)


def test_calibration_must_fit_the_models_layers(dit, calibration, tmp_path):
    layer = sorted(calibration.scales)[0]
    renamed = Calibration(calibration.model_hash, calibration.timesteps, calibration.step_groups,
                          {"no.such.layer": calibration.scales[layer]}, {}, calibration.meta)
    with pytest.raises(ValueError, match=r"bad\.json has scales for 'no.such.layer'"):
        Calibration.load(_saved(renamed, tmp_path, "bad")).check_model(dit.model)
    smoothed = Calibration(calibration.model_hash, calibration.timesteps, calibration.step_groups,
                           calibration.scales, {layer: torch.ones(3)}, calibration.meta)
    with pytest.raises(ValueError, match="has \\(3,\\) smoothing factors"):
        Calibration.load(_saved(smoothed, tmp_path, "bad")).check_model(dit.model)


# ------------------------------------------------------------------ user files: acceleration configs


def _config(tmp_path, document, name="acc.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "diffrt-acceleration/1", **document}))
    return path


@pytest.mark.parametrize("document, message", [
    ({"cuda_graphs": "no"}, "cuda_graphs must be true or false"),
    ({"cuda_graphs": 1}, "cuda_graphs must be true or false"),
    ({"steps": 2.5}, "steps must be a positive int"),
    ({"steps": True}, "steps must be a positive int"),
    ({"steps": 0}, "steps must be a positive int"),
    ({"solver": 3}, "solver must be"),
    ({"solver": "warp-drive"}, "solver must be None or a solver name .*dpmpp-2m.*got 'warp-drive'"),
    ({"dtype": ["float16"]}, "dtype must be"),
    ({"attention": 1}, "attention must be"),
    ({"adaptive_guidance": "0.95"}, "adaptive_guidance must be None or a finite number"),
    ({"adaptive_guidance": math.nan}, "adaptive_guidance must be"),
    ({"step_cache": math.inf}, "step_cache must be"),
    ({"step_cache": -0.1}, "step_cache must be"),
    ({"early_exit": 2}, "early_exit must be"),
    ({"early_exit": False}, "early_exit must be"),
    ({"warp": 9}, "unknown acceleration option"),
    ({"todo": {"factr": 2}}, "unknown ToDo option"),
    ({"todo": {"factor": 0}}, "ToDo: factor must be"),
    ({"todo": {"factor": {"x": 2}}}, "factor levels must be ints"),
    ({"sparse": "yes"}, "sparse must be a dict"),
    ({"sparse": {"kind": "window", "radius": -1}}, "Sparse: radius"),
    ({"int8": {"path": "cal", "seed": 1}}, "unknown key"),
    ({"int8": {"path": 5}}, "int8 must be"),
    ({"int8": {"path": "cal", "groups": "many"}}, "int8.groups must be"),
])
def test_wrong_values_in_a_config_are_refused_by_name(tmp_path, document, message):
    with pytest.raises(ValueError, match=rf"acc\.json: .*{message}"):
        Acceleration.load(_config(tmp_path, document))


def test_a_config_of_the_wrong_type_is_refused_saying_what_is_accepted(dit):
    from diffrt.runtime import optimize

    for config in (3, ["acc.json"]):
        with pytest.raises(TypeError, match="config must be an Acceleration, a dict or the path"):
            optimize(dit, config=config)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", DEEP.encode(), b"[1]", b'{"format": "diffrt-acc', b""])
def test_malformed_config_files_are_refused_by_name(tmp_path, content):
    path = tmp_path / "acc.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"acc\.json: "):
        Acceleration.load(path)


def test_a_saved_config_is_checked_and_a_hand_written_one_warns(tmp_path, caplog):
    acc = Acceleration(solver="unipc", steps=8, adaptive_guidance=0.95, cuda_graphs=True,
                       int8={"path": "cal", "groups": "auto"})
    path = acc.save(tmp_path / "acc.json", extra={"note": "tuned"})
    assert "sha256" in json.loads(path.read_text())
    assert Acceleration.load(path).replace(int8=acc.int8) == acc
    path.write_text(path.read_text().replace('"steps": 8', '"steps": 9'))  # a flipped digit
    with pytest.raises(ValueError, match="acc.json does not match its sha256"):
        Acceleration.load(path)
    path.write_text(path.read_text()[:40])  # truncated
    with pytest.raises(ValueError, match=r"acc\.json: is not JSON"):
        Acceleration.load(path)
    hand_written = _config(tmp_path, {"steps": 9, "cuda_graphs": False}, "hand.json")
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.acceleration"):
        assert Acceleration.load(hand_written) == Acceleration(steps=9)
    assert "carries no checksum" in caplog.text
    assert Acceleration.load(acc.save(tmp_path / "acc.json")).steps == 8  # the next good load
