"""Build script: the Python packages, and csrc/ through CMake into ``diffrt.kernels._C``.

``diffrt`` is a namespace whose packages live in top-level folders (README, Architecture):
``runtime/ -> diffrt.runtime``, ``kernels/ -> diffrt.kernels``, ``export/ -> diffrt.export``,
``bench/ -> diffrt.bench``, and ``runtime/serve/ -> diffrt.serve``.
Metadata and dependencies are in pyproject.toml.

The extension is built by CMake (CMakeLists.txt), driven by :class:`CMakeBuild`:

* C++ CPU kernels are always built (OpenMP when CMake finds it).
* CUDA kernels are built when CMake finds a CUDA compiler, for ``DIFFRT_CUDA_ARCHS``
  (default ``80;90a``); ``DIFFRT_CUDA=0`` skips them. A machine without nvcc installs fine.
* ``DIFFRT_BUILD_JOBS`` sets the parallel build level (default: the CPU count);
  ``DIFFRT_CMAKE_ARGS`` adds raw CMake arguments (split on whitespace).

``pip install -e .`` (pip >= 24) builds in place: the module lands in ``kernels/`` (ignored by
git as ``*.so``); ``pip install .`` puts it in the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by CMake from ``source_dir``."""

    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


def _cmake_executable() -> str:
    """The cmake binary: the `cmake` package's (a build requirement) or the one on PATH."""
    try:
        import cmake  # noqa: PLC0415 - only present in the build environment

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("cmake was not found: `pip install cmake` (pyproject.toml lists it as a build requirement)")
    return found


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "off", "false", "no")


class CMakeBuild(build_ext):
    """build_ext that configures and builds each :class:`CMakeExtension` with CMake."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # noqa: PLC0415 - a build requirement

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        cuda = os.environ.get("DIFFRT_CUDA")
        configure = [
            _cmake_executable(), "-S", ext.source_dir, "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDIFFRT_CUDA={'ON' if cuda is None or _truthy(cuda) else 'OFF'}",
        ]
        if os.environ.get("DIFFRT_CUDA_ARCHS"):
            configure.append(f"-DDIFFRT_CUDA_ARCHS={os.environ['DIFFRT_CUDA_ARCHS']}")
        configure += os.environ.get("DIFFRT_CMAKE_ARGS", "").split()
        jobs = os.environ.get("DIFFRT_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([_cmake_executable(), "--build", str(build_dir), "--config", config, "--parallel", jobs],
                       check=True)


setup(
    # diffrt.serve lives in runtime/serve/ (the top level is fixed) but is its own package: import it as diffrt.serve;
    # diffrt.bench is the bench/ folder (the benchmarking and tuning tools, apart from the runtime)
    packages=["diffrt.runtime", "diffrt.runtime.solvers", "diffrt.runtime.models", "diffrt.kernels", "diffrt.export",
              "diffrt.serve", "diffrt.bench"],
    package_dir={"diffrt.runtime": "runtime", "diffrt.kernels": "kernels", "diffrt.export": "export",
                 "diffrt.serve": "runtime/serve", "diffrt.bench": "bench"},
    package_data={"diffrt.runtime.models": ["weights/*.safetensors", "weights/*.json"], "diffrt.serve": ["*.yaml"]},
    ext_modules=[CMakeExtension("diffrt.kernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
