"""The shared harness of every diffrt benchmark: stamp, timer, cache control, sync counter, results.

``diffrt bench``, ``diffrt tune`` and the benchmark scripts of :mod:`diffrt.bench` use it.

* :func:`environment_stamp` - what a row was measured on: GPU name, compute capability, SM
  count, L2, driver, CUDA, torch / triton / diffusers / python versions, the repository's git
  SHA and dirty flag plus a hash of its sources (the device copy has no ``.git``); on CPU the
  CPU model and core count. No hostname.
* :func:`measure` - warm up, then time ``fn`` once per repeat: CUDA events on GPU (the queue is
  drained before each repeat, so a launch-bound loop is timed by its host cost), perf_counter
  on CPU. ``setup`` runs before each repeat, outside the timed region. Returns a
  :class:`Timing`; ``Timing.stats(scale)`` gives median, p20, p80, p99, min, mean and count.
* :func:`spread_note` - whether percentiles show that the timed calls were not warm (p99 more than
  :data:`SPREAD_LIMIT` times p50: recompiles, graph captures, lazy initialisation inside the timing).
* :class:`L2Flush` / :class:`RotatingInputs` - cold L2 for kernel benchmarks: overwrite a buffer
  twice the L2 size before each repeat, or cycle through enough input sets to overflow it.
* :class:`HostSyncCounter` / :func:`forbid_host_sync` - count (or forbid) host syncs in a region
  with ``torch.cuda.set_sync_debug_mode``; on CPU there is nothing to count (``count`` is None).
* :func:`write_results` - rows -> ``<gpu-or-cpu>-<yyyymmdd>-<topic>.json`` in a folder, each
  row carrying the stamp. Results kept for the record go to ``bench/results/``.
* :func:`measure_copy_bandwidth` - the measured memory ceiling (device-to-device copy, bytes read
  plus written), the peak that GB/s figures are compared with.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (editable install) or site-packages/diffrt
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SOURCE_DIRS = ("runtime", "kernels", "export", "csrc", "bench")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".txt", ".toml", ".sh")
SYNC_MESSAGE = "synchronizing CUDA operation"
SPREAD_LIMIT = 10.0  # p99 above this many times p50: what was timed was not warm


# ----------------------------------------------------------------------------- environment stamp

@functools.lru_cache(maxsize=None)
def environment_stamp(device: str = "cuda") -> dict[str, Any]:
    """What the numbers were measured on (hostname-free); ``device`` is "cuda" or "cpu"."""
    dev = torch.device(device)
    stamp: dict[str, Any] = {
        "device_type": dev.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "os": platform.system() + " " + platform.release(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **_git_state(),
        "source_hash": source_hash(),
        "native": _native_state(),
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        stamp.update({
            "gpu_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(),
            "cuda": torch.version.cuda,
        })
    return stamp


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    """The NVIDIA driver version (pynvml, else nvidia-smi), or None."""
    try:
        import pynvml  # noqa: PLC0415 - optional (nvidia-ml-py)

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - any failure means "ask nvidia-smi"
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_state() -> dict[str, Any]:
    """git SHA and dirty flag (read-only git calls); DIFFRT_GIT_SHA / DIFFRT_GIT_DIRTY override."""
    sha, dirty = os.environ.get("DIFFRT_GIT_SHA"), os.environ.get("DIFFRT_GIT_DIRTY")
    if sha is None and (REPO_ROOT / ".git").exists():
        sha = _git("rev-parse", "HEAD")
        if dirty is None:
            status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
            dirty = None if status is None else str(bool(status))
    return {"git_sha": sha, "git_dirty": None if dirty is None else dirty.lower() in ("1", "true", "yes")}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=20, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 (16 hex digits) over the repository's sources: identifies a tree with or without git."""
    digest = hashlib.sha256()
    paths = [REPO_ROOT / name for name in ("setup.py", "CMakeLists.txt", "pyproject.toml")]
    for folder in SOURCE_DIRS:
        paths += [p for p in (REPO_ROOT / folder).rglob("*") if p.suffix in SOURCE_SUFFIXES
                  and "__pycache__" not in p.parts and "results" not in p.parts]
    for path in sorted(p for p in paths if p.is_file()):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _native_state() -> str:
    """Whether diffrt's compiled module loads, and with which CUDA architectures."""
    try:
        from diffrt.kernels import registry  # noqa: PLC0415

        module, problem = registry.native()
    except Exception as error:  # noqa: BLE001 - a stamp records, never raises
        return f"unavailable: {error}"
    if module is None:
        return f"unavailable: {problem}"
    archs = getattr(module, "CUDA_ARCHS", "") if getattr(module, "HAVE_CUDA", False) else ""
    return f"built, CUDA {archs}" if archs else "built, CPU only"


def device_slug(stamp: dict[str, Any]) -> str:
    """'h100-80gb-hbm3' for 'NVIDIA H100 80GB HBM3'; 'cpu' on CPU."""
    if stamp.get("device_type") != "cuda":
        return "cpu"
    words = re.findall(r"[a-z0-9]+", str(stamp.get("gpu_name", "gpu")).lower())
    return "-".join(w for w in words if w not in ("nvidia", "geforce", "tesla")) or "gpu"


# ----------------------------------------------------------------------------- timing

def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass
class Timing:
    """Seconds per call, one entry per timed repeat."""

    seconds: list[float]

    def stats(self, scale: float = 1.0) -> dict[str, float]:
        """median, p20, p80, p90, p99, min, mean (each times ``scale``) and count."""
        values = sorted(s * scale for s in self.seconds)
        return {"median": quantile(values, 0.5), "p20": quantile(values, 0.2), "p80": quantile(values, 0.8),
                "p90": quantile(values, 0.9), "p99": quantile(values, 0.99), "min": values[0] if values else math.nan,
                "mean": sum(values) / len(values) if values else math.nan, "count": len(values)}


def spread_note(latency: dict[str, float], limit: float = SPREAD_LIMIT) -> str | None:
    """Why percentiles (``median`` and ``p99``, e.g. in ms) show the timed calls were not warm: p99 above
    ``limit`` times the median, or a non-finite / non-positive median. None when they look steady."""
    median, p99 = latency.get("median", math.nan), latency.get("p99", math.nan)
    if not (math.isfinite(median) and math.isfinite(p99) and median > 0):
        return f"p50 {median:.4g}, p99 {p99:.4g}: not a valid timing"
    if p99 > limit * median:
        return f"p99 {p99:.4g} ms > {limit:g}x p50 {median:.4g} ms: not warmed up (recompiles?)"
    return None


def measure(fn: Callable[[], Any], device: str | torch.device, warmup: int = 3, repeats: int = 20,
            setup: Callable[[], Any] | None = None, max_seconds: float | None = None) -> Timing:
    """Time ``fn()`` per call after ``warmup`` untimed calls.

    On CUDA each repeat drains the queue, then records events around ``fn`` on the current
    stream; on CPU it reads perf_counter. ``setup()`` runs before each call, untimed.
    ``max_seconds`` stops early (after at least 3 repeats) when the repeats take too long.
    ValueError for ``warmup`` < 0 or ``repeats`` < 1 (no timing is not a timing of 0 or NaN).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    dev = torch.device(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(dev)
    seconds: list[float] = []
    began = time.perf_counter()
    for _ in range(repeats):
        if setup is not None:
            setup()
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            tick = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - tick)
        if max_seconds is not None and len(seconds) >= 3 and time.perf_counter() - began > max_seconds:
            break
    return Timing(seconds)


def sync(dev: str | torch.device) -> None:
    """Wait for the device's queue (a no-op on CPU)."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def l2_bytes(device: str | torch.device) -> int:
    """L2 size of a CUDA device (50 MB if torch does not say); 0 on CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


class L2Flush:
    """``flush()`` overwrites a buffer twice the L2 size, so the next kernel starts cold (GPU only)."""

    def __init__(self, device: str | torch.device):
        dev = torch.device(device)
        size = 2 * l2_bytes(dev)
        self.buffer = torch.empty(size // 4, dtype=torch.int32, device=dev) if size else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.fill_(0x5A5A5A5A)


class RotatingInputs:
    """Cycle through input sets made by ``make()``: enough of them to exceed twice the L2.

    ``count`` fixes the number of sets; else it is derived from ``bytes_per_set`` (at most
    ``max_count``, at least 2). ``next()`` returns the following set.
    """

    def __init__(self, make: Callable[[], Any], device: str | torch.device, bytes_per_set: int | None = None,
                 count: int | None = None, max_count: int = 64):
        if count is None:
            cache = l2_bytes(device)
            count = 2 if not (cache and bytes_per_set) else min(max_count, max(2, math.ceil(2 * cache / bytes_per_set) + 1))
        self.sets = [make() for _ in range(count)]
        self._position = 0

    def next(self) -> Any:
        current = self.sets[self._position]
        self._position = (self._position + 1) % len(self.sets)
        return current


def measure_copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured memory ceiling in GB/s: a device-to-device copy, bytes read plus bytes written."""
    dev = torch.device(device)
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), dev, warmup=2, repeats=repeats)
    return 2 * src.numel() * 4 / timing.stats()["median"] / 1e9


# ----------------------------------------------------------------------------- host syncs

class HostSyncCounter:
    """Count host syncs inside a ``with`` block (CUDA: ``set_sync_debug_mode("warn")``).

    ``count`` is the number of synchronizing CUDA operations seen, or None on CPU where the
    notion does not apply. Other warnings raised in the block are re-issued on exit.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.count: int | None = None
        self._catcher: warnings.catch_warnings | None = None
        self._records: list | None = None
        self._previous = 0

    def __enter__(self) -> "HostSyncCounter":
        if self.device.type == "cuda":
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            self._previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode(self._previous)
        self._catcher.__exit__(*exc)
        syncs = [r for r in self._records or [] if SYNC_MESSAGE in str(r.message)]
        self.count = len(syncs)
        for record in self._records or []:
            if SYNC_MESSAGE not in str(record.message):
                warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)


class forbid_host_sync:  # noqa: N801 - used as a context manager
    """Inside the block a host sync raises RuntimeError (CUDA only; a no-op on CPU)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._previous = 0

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            self._previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(self._previous)


# ----------------------------------------------------------------------------- results

def results_path(out_dir: str | Path, topic: str, stamp: dict[str, Any]) -> Path:
    """``out_dir/<slug>-<yyyymmdd>-<topic>.json``; ``-2``, ``-3``... when that name is taken."""
    day = stamp.get("utc", _dt.datetime.now(_dt.timezone.utc).isoformat())[:10].replace("-", "")
    base = f"{device_slug(stamp)}-{day}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', topic)}"
    path = Path(out_dir) / f"{base}.json"
    number = 2
    while path.exists():
        path = Path(out_dir) / f"{base}-{number}.json"
        number += 1
    return path


def write_results(out_dir: str | Path, topic: str, rows: Iterable[dict[str, Any]],
                  stamp: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"topic", "stamp", "rows": [row + {"stamp": stamp}], **extra}``; returns the path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, topic, stamp)
    document = {"topic": topic, "stamp": stamp, **(extra or {}),
                "rows": [{**row, "stamp": stamp} for row in rows]}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    log.info("wrote %s", path)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], Any]]]) -> str:
    """A fixed-width text table: ``columns`` are (header, row -> cell) pairs."""
    cells = [[header for header, _ in columns]] + [[_cell(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 0.01 or abs(value) >= 1e4 else f"{value:.2f}"
    return str(value)
