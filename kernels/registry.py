"""One backend registry for every diffrt op (solver_step now; attention, norms, ... later).

An op is registered with a ``features`` function that maps a call's arguments to a small dict
of hashable facts (device type and index, dtypes, sizes that matter). Each backend of the op is
registered with a priority (lower runs first), the device types it serves and a predicate
``can_serve(features) -> None | str`` that returns None when it can serve the call, else the
reason it cannot. Then

* ``choose(op, *call, backend="auto")`` returns the first capable backend in priority order,
  cached per (op, requested backend, features), so the choice is made on the first (eager)
  call and a later call, e.g. inside CUDA-graph capture, costs a dict lookup;
* a forced backend (``backend="cpu"``) that cannot serve raises :class:`BackendUnavailable`
  with its reason; an unknown name raises ValueError listing the known ones;
* when "auto" skips a backend that serves the call's device type (say the CUDA kernel, built
  without CUDA), the fallback is logged once per key with the reason (logging, never print);
* ``explain(op, *call, backend="auto")`` returns human-readable lines: each backend, whether it
  was chosen, and why or why not.

The module-level functions act on one process-wide :class:`Registry`; ``diffrt.kernels``
exports this module as ``registry``.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping

log = logging.getLogger("diffrt.kernels")

Features = Mapping[str, Any]
Predicate = Callable[[Features], "str | None"]


class BackendUnavailable(RuntimeError):
    """A requested backend cannot serve the call; the message says why and what to change."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``run`` is called with the op's launcher arguments; ``devices`` lists the device types it
    serves (None: any); ``can_serve(features)`` returns None or the reason it cannot serve;
    ``auto_devices`` (None: all it serves) are the device types on which "auto" may pick it: a
    backend that serves a device only for tests (Triton's interpreter on CPU) runs there when
    forced by name.
    """

    name: str
    run: Callable[..., Any]
    can_serve: Predicate
    priority: int
    devices: tuple[str, ...] | None = None
    auto_devices: tuple[str, ...] | None = None

    def auto_reason(self, features: Features) -> str | None:
        """None when "auto" may pick this backend for ``features``, else why not."""
        if self.auto_devices is not None and features.get("device") not in self.auto_devices:
            return f"serves {features.get('device')} tensors only when requested by name"
        return self.reason(features)

    def reason(self, features: Features) -> str | None:
        """None when this backend can serve a call with ``features``, else why not."""
        device = features.get("device")
        if self.devices is not None and device not in self.devices:
            return f"serves {'/'.join(self.devices)} tensors; these are on {device}"
        return self.can_serve(features)

    def serves_device(self, features: Features) -> bool:
        return self.devices is None or features.get("device") in self.devices


@dataclass
class Op:
    """An op: how to read features from a call, and its backends in priority order."""

    name: str
    features: Callable[..., dict]
    backends: list[Backend] = field(default_factory=list)


class Registry:
    """Ops, their backends, and the cached choice per (op, requested backend, features)."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}
        self._choices: dict[tuple, Backend] = {}
        self._lock = threading.Lock()

    def add_op(self, name: str, features: Callable[..., dict]) -> None:
        """Declare op ``name``; ``features(*call, **kwargs)`` returns a dict of hashable values."""
        with self._lock:
            self._ops[name] = Op(name, features, self._ops[name].backends if name in self._ops else [])
            self._choices.clear()

    def register(self, op: str, name: str, run: Callable[..., Any], can_serve: Predicate, priority: int,
                 devices: tuple[str, ...] | None = None, auto_devices: tuple[str, ...] | None = None) -> Backend:
        """Add (or replace) backend ``name`` of ``op``; lower ``priority`` is tried first."""
        entry = self._op(op)
        backend = Backend(name, run, can_serve, priority, devices, auto_devices)
        with self._lock:
            entry.backends = sorted([b for b in entry.backends if b.name != name] + [backend], key=lambda b: b.priority)
            self._choices.clear()
        return backend

    def ops(self) -> list[str]:
        """Names of the registered ops."""
        return sorted(self._ops)

    def backends(self, op: str) -> list[str]:
        """Backend names of ``op`` in priority order."""
        return [b.name for b in self._op(op).backends]

    def features(self, op: str, *args: Any, **kwargs: Any) -> dict:
        """The features the op reads from a call (what the predicates and the cache key see)."""
        return self._op(op).features(*args, **kwargs)

    def choose(self, op: str, *args: Any, backend: str = "auto", **kwargs: Any) -> Backend:
        """The backend that runs this call (see :meth:`choose_for`)."""
        return self.choose_for(op, self.features(op, *args, **kwargs), backend)

    def choose_for(self, op: str, features: Features, backend: str = "auto") -> Backend:
        """The backend for a call with ``features``: forced by name, or the first capable one.

        Cached per (op, backend, features). Raises BackendUnavailable when a forced backend
        cannot serve (or, for "auto", when none can), ValueError for an unknown name.
        """
        key = (op, backend, tuple(sorted(features.items())))
        chosen = self._choices.get(key)
        if chosen is not None:
            return chosen
        chosen = self._decide(self._op(op), features, backend)
        with self._lock:
            self._choices[key] = chosen
        return chosen

    def explain(self, op: str, *args: Any, backend: str = "auto", **kwargs: Any) -> list[str]:
        """Lines saying, for each backend of ``op``, whether it would run this call and why."""
        entry = self._op(op)
        features = entry.features(*args, **kwargs)
        described = ", ".join(f"{k}={v}" for k, v in features.items())
        lines = [f"{op} ({described}), backend={backend!r}:"]
        try:
            chosen: Backend | None = self.choose_for(op, features, backend)
        except (BackendUnavailable, ValueError) as error:
            chosen = None
            lines.append(f"  no backend: {error}")
        for b in entry.backends:
            reason = b.reason(features) if backend != "auto" else b.auto_reason(features)
            if chosen is not None and b.name == chosen.name:
                lines.append(f"  {b.name}: chosen" + ("" if backend == "auto" else " (forced)"))
            elif reason is not None:
                lines.append(f"  {b.name}: cannot serve: {reason}")
            elif backend != "auto":
                lines.append(f"  {b.name}: could serve; not requested")
            else:
                lines.append(f"  {b.name}: could serve; lower priority than {chosen.name if chosen else '-'}")
        return lines

    def clear_cache(self) -> None:
        """Forget cached choices (after changing what a predicate depends on, e.g. in tests)."""
        with self._lock:
            self._choices.clear()

    def _op(self, op: str) -> Op:
        try:
            return self._ops[op]
        except KeyError:
            raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(self.ops()) or 'none'}") from None

    def _decide(self, entry: Op, features: Features, backend: str) -> Backend:
        names = [b.name for b in entry.backends]
        if backend != "auto":
            if backend not in names:
                raise ValueError(f"{entry.name}: unknown backend {backend!r}; choose one of {', '.join(['auto'] + names)}")
            forced = next(b for b in entry.backends if b.name == backend)
            reason = forced.reason(features)
            if reason is not None:
                raise BackendUnavailable(f"{entry.name}: backend {backend!r} cannot serve this call: {reason}")
            return forced
        skipped: list[str] = []
        for b in entry.backends:
            reason = b.auto_reason(features)
            if reason is None:
                if skipped:
                    log.warning("%s on %s: using backend %r; %s", entry.name, features.get("device"), b.name,
                                "; ".join(skipped))
                return b
            if b.serves_device(features) and (b.auto_devices is None or features.get("device") in b.auto_devices):
                skipped.append(f"{b.name!r} skipped: {reason}")
        raise BackendUnavailable(f"{entry.name}: no backend can serve this call ({'; '.join(skipped) or 'none registered'})")


_default = Registry()

add_op = _default.add_op
register = _default.register
ops = _default.ops
backends = _default.backends
features = _default.features
choose = _default.choose
choose_for = _default.choose_for
explain = _default.explain
clear_cache = _default.clear_cache


def default_registry() -> Registry:
    """The process-wide registry the module-level functions use."""
    return _default


@functools.lru_cache(maxsize=None)
def native() -> tuple[ModuleType | None, str | None]:
    """(diffrt.kernels._C, None) when the compiled module imports, else (None, why not).

    Imported on first use, never at ``import diffrt.kernels``.
    """
    try:
        from . import _C  # noqa: PLC0415
    except ImportError as error:
        return None, f"diffrt.kernels._C is not built ({error}); reinstall with `pip install -e .`"
    return _C, None


@functools.lru_cache(maxsize=None)
def cuda_problem(device_index: int) -> str | None:
    """None when the CUDA kernels of ``_C`` can run on cuda:``device_index``, else why not.

    Checked once per device (a CUDA call without a usable driver would fail with error 35):
    ``_C`` built with CUDA, torch sees a GPU, and its compute capability is at least the
    lowest architecture ``_C`` was compiled for (PTX for it JIT-compiles on newer GPUs).
    """
    import torch  # noqa: PLC0415

    module, problem = native()
    if module is None:
        return problem
    if not module.HAVE_CUDA:
        return "diffrt.kernels._C was built without CUDA (no nvcc at build time, or DIFFRT_CUDA=0)"
    if not torch.cuda.is_available():
        return "torch sees no usable CUDA device (no GPU or no driver)"
    majors = [int("".join(ch for ch in arch if ch.isdigit())) for arch in module.CUDA_ARCHS.split(",") if arch]
    lowest = min(majors, default=0)
    major, minor = torch.cuda.get_device_capability(device_index)
    if major * 10 + minor < lowest:
        name = torch.cuda.get_device_name(device_index)
        return (f"{name} is sm_{major}{minor}; diffrt.kernels._C was compiled for {module.CUDA_ARCHS} "
                f"(rebuild with DIFFRT_CUDA_ARCHS={major}{minor})")
    return None


def interpreting() -> bool:
    """Whether Triton runs interpreted on CPU tensors (``TRITON_INTERPRET=1``, the CPU test tier)."""
    import os  # noqa: PLC0415

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_problem(features: Mapping[str, Any]) -> str | None:
    """None when a Triton kernel can serve a call with ``features`` (device, index), else why not:
    CUDA tensors of compute capability >= 8.0, or CPU tensors under the interpreter."""
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as error:
        return f"triton is not installed ({error})"
    if features["device"] == "cpu":
        return None if interpreting() else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (tests)"
    if features["device"] != "cuda":
        return f"Triton serves CUDA tensors; these are on {features['device']}"
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return "torch sees no usable CUDA device"
    major, minor = torch.cuda.get_device_capability(features["index"] or 0)
    if major < 8:
        return f"diffrt's Triton kernels need compute capability >= 8.0; this GPU is {major}.{minor}"
    return None
