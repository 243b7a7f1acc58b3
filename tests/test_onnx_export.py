"""ONNX export (float and INT8 QDQ), the ONNX Runtime backend behind the Sampler, and the export cache."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffrt.export import calibrate, export_groups, export_onnx
from diffrt.export.artifacts import ArtifactCache
from diffrt.export.onnx_export import load_manifest
from diffrt.export.ort_backend import OrtDenoiser
from diffrt.runtime import Denoiser, Sampler, cli, models, optimize, quality
from diffrt.runtime.attention import Sparse, ToDo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
LABELS = torch.arange(10)
NULL = torch.tensor([models.NULL_CLASS])


def _run(path, x, t, cond=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"sample": x.numpy(), "timestep": t.numpy()}
    if cond is not None:
        feeds["cond"] = cond.numpy()
    return torch.from_numpy(session.run(None, feeds)[0])


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def dit():
    return models.load("digits-dit")


@pytest.fixture(scope="module")
def calibration(dit):
    return calibrate(dit, "dpmpp-2m", 6, cond=LABELS, uncond=NULL, guidance_scale=3.0, groups="auto", progress=False)


@pytest.mark.parametrize("name", ["digits-dit", "digits-unet"])
def test_reference_models_match_in_onnx_runtime(name, tmp_path):
    den = models.load(name)
    result = export_onnx(den, tmp_path / f"{name}.onnx")
    assert result.manifest["inputs"]["sample"][0] == "batch" and result.manifest["opset"] >= 17
    onnx.checker.check_model(str(result.path))
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 16, 16, generator=gen)
        t, y = torch.tensor([999.0, 500.0, 2.0][:batch]), torch.tensor([1, models.NULL_CLASS, 4][:batch])
        with torch.no_grad():
            assert _rel(_run(result.path, x, t, y), den(x, t, y)) <= 1e-4
    if name == "digits-unet":  # UNets keep height and width dynamic
        x, t, y = torch.randn(2, 1, 24, 32, generator=gen), torch.tensor([10.0, 700.0]), torch.tensor([3, 8])
        with torch.no_grad():
            assert _rel(_run(result.path, x, t, y), den(x, t, y)) <= 1e-4


def test_tiny_diffusers_models_match(tmp_path):
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=8, norm_num_groups=8).eval()
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()
    gen = torch.Generator().manual_seed(1)
    for model, cond in ((unet, torch.randn(3, 77, 24, generator=gen)), (dit, torch.tensor([1, 5, 9]))):
        den = Denoiser.from_diffusers(model, SCHEDULE)
        path = export_onnx(den, tmp_path / f"{type(model).__name__}.onnx").path
        x, t = torch.randn(3, 4, 16, 16, generator=gen), torch.tensor([999.0, 400.0, 1.0])
        with torch.no_grad():
            assert _rel(_run(path, x, t, cond), den(x, t, cond)) <= 1e-4, type(model).__name__


def test_static_batch_is_static(dit, tmp_path):
    path = export_onnx(dit, tmp_path / "b2.onnx", batch=2).path
    assert load_manifest(path)["inputs"]["sample"] == [2, 1, 16, 16]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _run(path, torch.randn(3, 1, 16, 16), torch.ones(3), torch.zeros(3, dtype=torch.int64))


def test_int8_qdq_graph_stays_within_the_int8_paths_error(dit, calibration, tmp_path):
    result = export_onnx(dit, tmp_path / "int8.onnx", calibration=calibration)
    ops = [node.op_type for node in onnx.load(str(result.path)).graph.node]
    layers = len(calibration.scales)
    assert ops.count("QuantizeLinear") == layers and ops.count("DequantizeLinear") == 2 * layers  # acts + int8 weights
    assert result.manifest["int8_scales"] == "per-sample"
    float_size = export_onnx(dit, tmp_path / "float.onnx").path.stat().st_size
    assert result.path.stat().st_size < 0.75 * float_size
    fast = optimize(dit, int8=calibration)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 16, 16, generator=gen)
    t = torch.tensor([calibration.timesteps[i] for i in (0, 2, 4, 5)], dtype=torch.float32)  # mixed groups
    y = torch.tensor([0, 3, models.NULL_CLASS, 9])
    with torch.no_grad():
        exact, int8 = dit(x, t, y), fast(x, t, y)
    qdq = _run(result.path, x, t, y)
    own_error = _rel(int8, exact)
    assert _rel(qdq, exact) <= 1.5 * own_error + 1e-3
    assert _rel(qdq, int8) <= own_error


def test_per_group_graphs_share_one_weight_file(dit, calibration, tmp_path):
    results = export_groups(dit, tmp_path / "groups", calibration)
    assert len(results) == calibration.groups >= 2
    assert {r.manifest["data_file"] for r in results} == {"weights.data"}
    assert sorted(p.name for p in (tmp_path / "groups").glob("*.data")) == ["weights.data"]
    assert all(r.path.stat().st_size < 0.1 * (tmp_path / "groups" / "weights.data").stat().st_size for r in results)
    fast = optimize(dit, int8=calibration)
    gen = torch.Generator().manual_seed(3)
    for result in results:
        # a constant-scale graph is what ONNX Runtime turns into its own int8 kernels: compare with
        # diffrt's INT8 path within that path's own error against fp32
        step = calibration.step_groups.index(result.manifest["group"])
        x, t = torch.randn(2, 1, 16, 16, generator=gen), torch.full((2,), calibration.timesteps[step])
        y = torch.tensor([2, 7])
        with torch.no_grad():
            exact, int8 = dit(x, t, y), fast(x, t, y)
        assert _rel(_run(result.path, x, t, y), int8) <= max(_rel(int8, exact), 1e-3)


def test_sampler_runs_the_int8_export_in_onnx_runtime(dit, calibration, tmp_path):
    """Done when: the reference DiT with its INT8 calibration, exported, sampled in ONNX Runtime."""
    ort_den = optimize(dit, int8=calibration, backend="onnxruntime", backend_options={"cache": tmp_path})
    assert isinstance(ort_den, OrtDenoiser)
    torch_int8 = optimize(dit, int8=calibration)
    labels = LABELS.repeat(3)
    noise = torch.randn(len(labels), *dit.sample_shape, generator=torch.Generator().manual_seed(4))
    uncond = torch.full_like(labels, models.NULL_CLASS)
    samples = {name: Sampler(den, "dpmpp-2m", 6, guidance_scale=3.0).sample(noise, cond=labels, uncond=uncond)
               for name, den in (("ort", ort_den), ("torch", torch_int8))}
    accuracy = {name: quality.class_accuracy(x, labels) for name, x in samples.items()}
    assert abs(accuracy["ort"] - accuracy["torch"]) <= 1 / 30 and accuracy["ort"] >= 0.9, accuracy
    assert quality.psnr(samples["ort"], samples["torch"]).mean() > 30
    with pytest.raises(ValueError, match="made for a 6-step plan"):
        Sampler(ort_den, "dpmpp-2m", 10, guidance_scale=3.0)


def test_the_cache_reuses_and_rebuilds_with_a_reason(dit, tmp_path, monkeypatch, caplog):
    cache = {"cache": tmp_path}
    first = optimize(dit, backend="onnxruntime", backend_options=cache)
    import diffrt.export.ort_backend as backend_module

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this graph")

    monkeypatch.setattr(backend_module, "export_onnx", no_export)
    second = optimize(dit, backend="onnxruntime", backend_options=cache)
    assert second.onnx_path == first.onnx_path
    first.onnx_path.write_bytes(b"not an onnx file")
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="diffrt.export.artifacts"):
        rebuilt = optimize(dit, backend="onnxruntime", backend_options=cache)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert _rel(rebuilt(x, t, y), dit(x, t, y)) <= 1e-4
    other = models.load("digits-dit")
    with torch.no_grad():
        other.model.final_layer.linear.bias += 0.1
    assert optimize(other, backend="onnxruntime", backend_options=cache).onnx_path != first.onnx_path


def test_todo_is_exported_and_errors_are_clear(dit, tmp_path):
    todo = optimize(dit, todo=ToDo(2, min_tokens=0))
    path = export_onnx(todo, tmp_path / "todo.onnx").path
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert _rel(_run(path, x, t, y), todo(x, t, y)) <= 1e-4
        assert _rel(todo(x, t, y), dit(x, t, y)) > 1e-3
    with pytest.raises(NotImplementedError, match="block-sparse"):
        export_onnx(optimize(dit, sparse=Sparse(min_tokens=0, q_block=16, k_block=16)), tmp_path / "sparse.onnx")
    with pytest.raises(TypeError, match="float32 graphs"):
        export_onnx(models.load("digits-dit", dtype=torch.bfloat16), tmp_path / "bf16.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    (tmp_path / "broken.json").write_text('{"format": "diffrt-onnx/1", "inputs": {}, "input_dtypes": {}}')
    with pytest.raises(RuntimeError, match="ONNX Runtime cannot load"):
        OrtDenoiser(dit, tmp_path / "broken.onnx")
    with pytest.raises(FileNotFoundError, match="not exported by diffrt"):
        load_manifest(tmp_path / "missing.onnx")
    with pytest.raises(NotImplementedError, match="not 'dynamic'"):
        optimize(dit, int8="dynamic", backend="onnxruntime")


def test_cli_export_writes_the_graph_and_says_so(tmp_path, capsys):
    assert cli.main(["export", "onnx", "--model", "digits-unet", "--out", str(tmp_path / "unet.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "unet.onnx" in printed and "opset 17" in printed
    assert (tmp_path / "unet.onnx").is_file() and (tmp_path / "unet.json").is_file()
    assert cli.main(["export", "onnx", "--model", "no-such-model"]) == 2


def test_cli_tensorrt_without_tensorrt_says_how_to_install(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with caplog.at_level(logging.ERROR, logger="diffrt"):
        assert cli.main(["export", "tensorrt", "--model", "digits-dit"]) == 2
    assert "pip install tensorrt" in caplog.text


def test_artifact_cache_needs_a_manifest_and_the_same_key(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = {"model": "m", "shape": [1, 2]}
    assert cache.lookup("thing", key, lambda folder: None) is None
    folder = cache.prepare("thing", key)
    (folder / "file").write_text("x")
    assert cache.lookup("thing", key, lambda f: None) is None  # not committed: an interrupted build
    cache.commit(folder, key)
    assert cache.lookup("thing", key, lambda f: None) == folder
    assert cache.lookup("thing", {**key, "shape": [1, 3]}, lambda f: None) is None

    def broken(folder):
        raise ValueError("truncated")

    assert cache.lookup("thing", key, broken) is None
    assert np.array_equal(np.array(key["shape"]), np.array([1, 2]))
