"""The TensorRT backend without TensorRT: the install hint, profiles, engine keys, the engine cache's
checks; and, where tensorrt imports (a GPU machine), a built engine against PyTorch."""
from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from diffrt.export import tensorrt_backend as trt_backend
from diffrt.export.artifacts import ArtifactCache

MANIFEST = {"model_hash": "abc", "calibration": None, "group": None, "opset": 17, "todo": "None",
            "inputs": {"sample": ["batch", 4, "height", "width"], "timestep": ["batch"], "cond": ["batch", 77, 768]},
            "input_dtypes": {"sample": "float32", "timestep": "float32", "cond": "float32"}, "int8_scales": None}
GPU = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_missing_tensorrt_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError, match="pip install tensorrt"):
        trt_backend.tensorrt()


def test_profiles_give_min_opt_max_shapes():
    profile = trt_backend.Profile((1, 2, 8), ((32, 32), (64, 64), (128, 96)))
    shapes = profile.shapes(MANIFEST)
    assert shapes["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 96))
    assert shapes["timestep"] == ((1,), (2,), (8,)) and shapes["cond"][2] == (8, 77, 768)
    with pytest.raises(ValueError, match="dynamic height: give Profile"):
        trt_backend.Profile((1, 1, 4)).shapes(MANIFEST)
    static = {**MANIFEST, "inputs": {"sample": [2, 4, 64, 64]}}
    assert trt_backend.Profile((1, 1, 1)).shapes(static)["sample"] == ((2, 4, 64, 64),) * 3
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trt_backend.Profile((4, 2, 8))


def test_engine_keys_change_with_everything_an_engine_depends_on():
    profiles = [trt_backend.Profile((1, 2, 4), ((64, 64),) * 3)]
    base = trt_backend.engine_key(MANIFEST, "fp16", profiles, GPU, "10.9.0")
    assert base == trt_backend.engine_key(dict(MANIFEST), "fp16", list(profiles), dict(GPU), "10.9.0")
    variants = [
        trt_backend.engine_key(MANIFEST, "bf16", profiles, GPU, "10.9.0"),
        trt_backend.engine_key(MANIFEST, "fp16", profiles, GPU, "10.10.0"),
        trt_backend.engine_key(MANIFEST, "fp16", profiles, {**GPU, "gpu": "NVIDIA H200"}, "10.9.0"),
        trt_backend.engine_key(MANIFEST, "fp16", profiles, {**GPU, "compute_capability": "8.0"}, "10.9.0"),
        trt_backend.engine_key({**MANIFEST, "model_hash": "def"}, "fp16", profiles, GPU, "10.9.0"),
        trt_backend.engine_key({**MANIFEST, "calibration": "c1", "group": 0}, "fp16", profiles, GPU, "10.9.0"),
        trt_backend.engine_key({**MANIFEST, "calibration": "c1", "group": 1}, "fp16", profiles, GPU, "10.9.0"),
        trt_backend.engine_key(MANIFEST, "fp16", [trt_backend.Profile((1, 2, 8), ((64, 64),) * 3)], GPU, "10.9.0"),
    ]
    from diffrt.export.artifacts import key_hash

    hashes = {key_hash(k) for k in [base, *variants]}
    assert len(hashes) == len(variants) + 1


def test_engine_cache_reuses_checked_engines_and_rebuilds_corrupt_ones(tmp_path, monkeypatch):
    builds = []

    def fake_build(onnx_path, precision, profiles, timing_cache, workspace):
        builds.append(precision)
        return f"engine-{len(builds)}".encode()

    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    cache = ArtifactCache(tmp_path)
    key = trt_backend.engine_key(MANIFEST, "fp16", [trt_backend.Profile()], GPU, "10.9.0")
    assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-1"
    assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-1" and len(builds) == 1
    plan = cache.folder("tensorrt", key) / "engine.plan"
    plan.write_bytes(b"engine-1 but truncated")
    assert trt_backend._engine_bytes(cache, key, tmp_path / "m.onnx", [], 1) == b"engine-2"  # checksum caught it
    other = trt_backend.engine_key(MANIFEST, "bf16", [trt_backend.Profile()], GPU, "10.9.0")
    assert trt_backend._engine_bytes(cache, other, tmp_path / "m.onnx", [], 1) == b"engine-3"
    assert builds == ["fp16", "fp16", "bf16"]


class _FakeConfig:
    """TensorRT's builder config, as far as build_engine uses it: records the timing cache it was given."""

    def __init__(self, seen: list):
        self.seen, self.timing = seen, None

    def create_timing_cache(self, data: bytes):
        self.seen.append(bytes(data))
        return bytes(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache

    def get_timing_cache(self):  # a build adds its measurements to the cache it started from
        return SimpleNamespace(serialize=lambda: self.timing + b"[timings of build %d]" % len(self.seen))

    def set_memory_pool_limit(self, *args):
        pass

    def set_flag(self, flag):
        pass

    def add_optimization_profile(self, profile):
        pass


def _fake_tensorrt(seen: list) -> SimpleNamespace:
    """A stand-in ``tensorrt`` module: every call build_engine makes, no GPU."""
    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return _FakeConfig(seen)

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *args: None)

        def build_serialized_network(self, network, config):
            return b"engine"

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    parser = SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    return SimpleNamespace(Logger=Logger, Builder=Builder, OnnxParser=lambda network, logger: parser,
                           MemoryPoolType=SimpleNamespace(WORKSPACE=0),
                           BuilderFlag=SimpleNamespace(FP16=1, BF16=2, INT8=3))


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """``build(timing_cache)`` runs build_engine with TensorRT faked; returns the timing cache each build was given."""
    seen: list[bytes] = []
    fake = _fake_tensorrt(seen)
    monkeypatch.setattr(trt_backend, "tensorrt", lambda: fake)
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"graph")
    graph.with_suffix(".json").write_text(json.dumps({"format": "diffrt-onnx/1", "int8_scales": None,
                                                      "inputs": {"sample": [1, 1, 16, 16]}}))

    def build(timing_cache):
        assert trt_backend.build_engine(graph, "fp16", [trt_backend.Profile((1, 1, 1))], timing_cache) == b"engine"
        return seen[-1]

    return build


def _damage(path):
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", [
    _damage,
    lambda path: path.write_bytes(path.read_bytes()[:10]),  # truncated
    lambda path: path.with_name("timing.cache.sha256").unlink(),  # no checksum (an interrupted write)
    lambda path: path.with_name("timing.cache.sha256").write_text("0" * 64),
])
def test_a_damaged_timing_cache_is_discarded_never_used(tmp_path, fake_build, caplog, fault):
    timing = tmp_path / "tensorrt" / "timing.cache"
    assert fake_build(timing) == b""  # no timing cache yet: TensorRT starts an empty one
    first = timing.read_bytes()
    assert first == b"[timings of build 1]"
    checksum = timing.with_name("timing.cache.sha256").read_text().split()
    assert checksum == [trt_backend.hashlib.sha256(first).hexdigest()]
    assert fake_build(timing) == first  # a good one is reused
    second = timing.read_bytes()
    fault(timing)
    with caplog.at_level(logging.WARNING, logger="diffrt.export.tensorrt_backend"):
        assert fake_build(timing) == b""  # the damaged bytes never reach TensorRT
    assert "timing cache" in caplog.text and "discarded" in caplog.text and str(timing) in caplog.text
    rebuilt = timing.read_bytes()
    assert rebuilt == b"[timings of build 3]" and rebuilt != second
    assert fake_build(timing) == rebuilt  # the new one is whole: the next build uses it


def test_timing_cache_helpers_round_trip(tmp_path):
    path = tmp_path / "deeper" / "timing.cache"
    assert trt_backend.read_timing_cache(path) == b""
    trt_backend.write_timing_cache(path, b"\x00timings\xff")
    assert trt_backend.read_timing_cache(path) == b"\x00timings\xff"
    path.write_bytes(b"\x00timings\xfe")
    assert trt_backend.read_timing_cache(path) == b"" and not path.exists()


@pytest.mark.gpu
def test_engine_matches_pytorch_where_tensorrt_is_installed(tmp_path):
    pytest.importorskip("tensorrt")
    from diffrt.runtime import models, optimize

    den = models.load("digits-dit", device="cuda")
    engine = optimize(den, dtype=torch.float32, backend="tensorrt",
                      backend_options={"cache": tmp_path, "batch_range": (1, 2, 4)})
    x = torch.randn(3, 1, 16, 16, device="cuda")
    t, y = torch.tensor([999.0, 500.0, 3.0], device="cuda"), torch.tensor([1, 10, 4], device="cuda")
    with torch.no_grad():
        expected = den(x, t, y)
        got = engine(x, t, y)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-2
