"""The build and the registry: _C imports with its flags, backends are explained and chosen,
unavailable backends say why, a CPU-only CMake build (DIFFRT_CUDA=OFF) works, and importing
diffrt.kernels never touches the GPU."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrt.kernels import BackendUnavailable, registry, solver_step, solver_step_reference
from diffrt.kernels.registry import Registry
from diffrt.kernels.solver_step import table_width

ROOT = Path(__file__).resolve().parents[1]


def _case(device: str = "cpu", slots: int = 1):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 5)
    x, cond, uncond = (torch.randn(shape, generator=gen).to(device) for _ in range(3))
    history = torch.randn(slots, *shape, generator=gen).to(device)
    table = torch.randn(3, table_width(2, slots), generator=gen).to(device)
    itable = torch.tensor([[-1, -1, 0]] * 3, dtype=torch.int32, device=device)
    return x, cond, uncond, history, None, table, itable, torch.tensor(1, device=device)


def test_C_imports_with_its_flags():
    from diffrt.kernels import _C

    assert isinstance(_C.HAVE_CUDA, bool)
    assert isinstance(_C.HAVE_OPENMP, bool)
    assert _C.MAX_SLOTS == 8
    assert bool(_C.CUDA_ARCHS) == _C.HAVE_CUDA  # "80,90a" unless DIFFRT_CUDA_ARCHS overrode it
    assert registry.native() == (_C, None)


def test_explain_mentions_each_backend_and_the_choice():
    lines = registry.explain("solver_step", *_case())
    text = "\n".join(lines)
    for name in ("reference", "cpu", "cuda"):
        assert re.search(rf"^  {name}: ", text, re.M), text
    assert "  cpu: chosen" in text
    assert "  cuda: cannot serve: serves cuda tensors; these are on cpu" in text
    assert registry.backends("solver_step") == ["cuda", "cpu", "reference"]


def test_auto_on_cpu_picks_the_cpp_kernel():
    assert registry.choose("solver_step", *_case()).name == "cpu"
    assert registry.choose("solver_step", *_case(), backend="reference").name == "reference"


def test_forcing_cuda_on_cpu_tensors_raises_a_clear_error():
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot serve this call: serves cuda tensors; these are on cpu"):
        solver_step(*_case(), backend="cuda")
    forced = "\n".join(registry.explain("solver_step", *_case(), backend="cuda"))
    assert "no backend: solver_step: backend 'cuda' cannot serve" in forced


def test_missing_C_falls_back_to_the_reference_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(registry, "native", lambda: (None, "diffrt.kernels._C is not built (simulated)"))
    registry.clear_cache()
    try:
        with caplog.at_level("WARNING", logger="diffrt.kernels"):
            args = _case()
            out = solver_step(*args)
        assert "using backend 'reference'" in caplog.text and "is not built (simulated)" in caplog.text
        assert torch.equal(out, solver_step_reference(*_case()))
        with pytest.raises(BackendUnavailable, match="not built"):
            solver_step(*_case(), backend="cpu")
    finally:
        registry.clear_cache()


def test_cuda_problems_are_explained(monkeypatch):
    class Fake:
        HAVE_CUDA, CUDA_ARCHS, MAX_SLOTS = False, "", 8

    check = registry.cuda_problem.__wrapped__
    monkeypatch.setattr(registry, "native", lambda: (Fake, None))
    assert "built without CUDA" in check(0)
    Fake.HAVE_CUDA, Fake.CUDA_ARCHS = True, "80,90a"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA device" in check(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    assert "Tesla T4 is sm_75; diffrt.kernels._C was compiled for 80,90a" in check(0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    assert check(0) is None


def test_registry_priority_cache_and_forced_reasons():
    reg, calls = Registry(), []
    reg.add_op("toy", lambda x: {"device": x.device.type, "dtype": str(x.dtype)})

    def fast_ok(features):
        calls.append(features)
        return None if features["dtype"] == "torch.float32" else "fast takes float32 only"

    reg.register("toy", "slow", lambda x: "slow", lambda f: None, priority=50)
    reg.register("toy", "fast", lambda x: "fast", fast_ok, priority=1, devices=("cpu",))
    assert reg.backends("toy") == ["fast", "slow"]
    x = torch.zeros(2)
    assert reg.choose("toy", x).run(x) == "fast"
    assert reg.choose("toy", x).name == "fast" and len(calls) == 1  # cached per features
    assert reg.choose("toy", x.double()).name == "slow"
    with pytest.raises(BackendUnavailable, match="fast takes float32 only"):
        reg.choose("toy", x.double(), backend="fast")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        reg.choose("nope", x)
    lines = reg.explain("toy", x.double())
    assert lines[1:] == ["  fast: cannot serve: fast takes float32 only", "  slow: chosen"]


def test_import_does_not_touch_the_gpu():
    code = ("import torch, diffrt.kernels, diffrt.kernels.registry as r; "
            "assert not torch.cuda.is_initialized(); assert r.native.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packaging_metadata():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = meta["build-system"]["requires"]
    assert not any(r.startswith("torch") for r in requires)
    assert {"setuptools", "wheel", "pybind11", "cmake"} <= {re.split(r"[<>=;\[ ]", r)[0] for r in requires}
    assert meta["project"]["scripts"]["diffrt"] == "diffrt.runtime.cli:main"
    assert any(d.startswith("triton") and "Linux" in d for d in meta["project"]["dependencies"])
    for source in (ROOT / "csrc").iterdir():
        assert "torch/" not in source.read_text() and "ATen" not in source.read_text(), source


@pytest.mark.skipif(shutil.which("cmake") is None or importlib.util.find_spec("pybind11") is None,
                    reason="needs cmake and pybind11 (build requirements) in this environment")
def test_cpu_only_cmake_build(tmp_path):
    """DIFFRT_CUDA=OFF builds a module without CUDA that still runs the C++ kernel."""
    import pybind11

    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DDIFFRT_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_C", next(build.glob("_C*.so")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAVE_CUDA is False and module.CUDA_ARCHS == ""
    x, cond, uncond, history, _, table, itable, step = _case()
    out, hist = torch.empty_like(x), history.clone()
    module.solver_step_cpu(x.data_ptr(), cond.data_ptr(), uncond.data_ptr(), hist.data_ptr(), 0, out.data_ptr(),
                           table.data_ptr(), itable.data_ptr(), step.data_ptr(), x.numel(), 3, 0, 2, 1, 0, 0)
    ref_hist = history.clone()
    assert torch.equal(out, solver_step_reference(x, cond, uncond, ref_hist, None, table, itable, step))
    assert torch.equal(hist, ref_hist)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        module.solver_step_cuda(x.data_ptr(), cond.data_ptr(), 0, 0, 0, out.data_ptr(), table.data_ptr(),
                                itable.data_ptr(), step.data_ptr(), x.numel(), 3, 0, 1, 0, 0, 0, 0)
