"""Host syncs and host-to-device copies, counted: on CPU by emulating device residency, on CUDA for real.

A sampling loop that never waits for the GPU can run ahead of it (and be captured in a CUDA graph).
Two things make the host wait: a **blocking read** of a value that lives on the device (``.item()``,
``int()`` / ``float()`` / ``bool()`` of a tensor, ``nonzero``, boolean-mask indexing and every other op
whose output shape depends on the data, ``tolist``, ``.cpu()``, a copy into a host tensor) and a
**blocking host-to-device copy** (``.to(device)`` of host data, ``torch.tensor(data, device=...)``, a
copy from pageable memory). Both are counted here, per section of a run (setup, steps).

On CPU (:func:`emulated_device`) the device is emulated: a value "lives on the device" when it was
put there (:meth:`EmulatedDevice.to_device`: a tensor, or a module's parameters and buffers), created
on it, or computed from such values. Device tensors report ``EMULATED_DEVICE`` (``cpu:0``) as their
device, host tensors plain ``cpu``, so code that writes ``torch.zeros(..., device=x.device)`` or
``t.to(x.device)`` creates device tensors / copies to the device as it would on a GPU. The rules:

* a factory (``zeros``, ``randn``, ``arange``, ``full``, ...) makes a device tensor when called with
  ``device=EMULATED_DEVICE`` (e.g. ``device=x.device`` of a device tensor), else a host tensor;
  ``*_like`` / ``new_*`` follow their input; a generator's own draws are host tensors (a CPU generator);
* ``torch.tensor`` / ``as_tensor`` / ``new_tensor`` of Python or host data with a device target, and
  ``.to(device)`` of a host tensor, are one host-to-device copy each (blocking; a ``non_blocking`` copy
  from pinned memory is counted apart, as asynchronous); a host tensor of one or more dimensions that
  enters an op with device tensors counts as one such copy too (0-dim host tensors are kernel scalars);
* a blocking read of a device value is one sync: ops tagged ``data_dependent_output`` or
  ``dynamic_output_shape`` by ATen (``item`` / ``int()`` / ``bool()``, ``nonzero``, ``unique``, ...;
  ``index`` / ``index_put`` only with a boolean mask, ``repeat_interleave`` only without
  ``output_size``), ``one_hot`` without ``num_classes``, ``equal``, a host tensor indexed with device
  indices (ATen moves them to the host), ``tolist`` / ``numpy`` / printing, ``.cpu()`` / ``.to("cpu")``,
  and a copy into a host tensor unless it is ``non_blocking`` into pinned memory
  (:meth:`EmulatedDevice.pin`; ``pin_memory=True`` is emulated);
* residency belongs to the tensor and outlives a block (a sampler's cached device tables stay on the
  device); only the thread that entered the block is watched.

What the emulation cannot see: code behind ``device.type == "cuda"`` (device tensors are still CPU
tensors), and C++ kernels reading raw pointers (they never sync).

On CUDA (:func:`sync_counter` with a CUDA device) the same API counts the real thing: every
synchronizing operation reported by ``torch.cuda.set_sync_debug_mode("warn")``, host-to-device copies
told apart by the devices of the copy. :class:`LaggedRead` is the way around a blocking read: a device
value copied without waiting into pinned memory, read one step late.
"""
from __future__ import annotations

import contextlib
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["EMULATED_DEVICE", "Counts", "SyncEvent", "EmulatedDevice", "CudaSyncCounter", "LaggedRead",
           "SamplingCounts", "emulated_device", "sync_counter", "current_emulation", "is_device_resident",
           "count_sampling", "count_calls"]

EMULATED_DEVICE = torch.device("cpu", 0)  # what device tensors report under the emulation; host tensors: cpu
SYNC_MESSAGE = "synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s warning

aten = torch.ops.aten
_BLOCKING_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_ALWAYS_BLOCKING = {aten.equal, aten.is_nonzero, aten._local_scalar_dense, aten.item}
_MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__repr__,
          torch.Tensor.__str__, torch.Tensor.__format__}
# composite ops whose CPU decomposition reads more than their CUDA kernel: whether the CUDA one reads
_UNITS = {torch.nn.functional.one_hot: lambda args, kwargs: (args[1] if len(args) > 1
                                                             else kwargs.get("num_classes", -1)) == -1}
_HERE = os.path.abspath(__file__)
# Residency is a property of the tensor, kept across emulation blocks (so a sampler's cached device
# tables, or a model put on the device once, stay there); outside a block nothing reads it.
_RESIDENT = WeakTensorKeyDictionary()  # the tensors that would live on the GPU
_PINNED = WeakTensorKeyDictionary()  # host tensors in (emulated) pinned memory
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_DEVICE_ATTRIBUTE = torch._C.TensorBase.__dict__["device"]  # what tensor.device calls (a torch function)
_DATA_ATTRIBUTE = torch._C.TensorBase.__dict__["data"]
_ACTIVE = threading.local()  # .emulation: the emulated_device() block of this thread


@dataclass
class Counts:
    """Blocking syncs, blocking and asynchronous host-to-device copies, asynchronous device-to-host copies."""

    syncs: float = 0
    h2d: float = 0
    h2d_async: float = 0
    d2h_async: float = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def per(self, n: int) -> "Counts":
        """These counts divided by ``n`` (calls, steps)."""
        return Counts(*(getattr(self, f.name) / max(n, 1) for f in fields(self)))


@dataclass(frozen=True)
class SyncEvent:
    """One counted event: ``kind`` a :class:`Counts` field, ``op`` what did it, ``where`` the caller's line."""

    kind: str
    op: str
    where: str
    section: str


class SyncCounter:
    """Events by section (:meth:`section`, :meth:`switch`); :meth:`counts` sums them."""

    device: torch.device

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self.current_section = "main"
        self._quiet = 0  # > 0: count nothing

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Events inside the block are counted under ``name`` (the previous section is restored after)."""
        previous = self.current_section
        self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def switch(self, name: str) -> None:
        """From now on, events are counted under ``name``."""
        self.current_section = name

    def counts(self, section: str | None = None) -> Counts:
        """The events of ``section`` (all of them with None) as :class:`Counts`."""
        return _sum(e for e in self.events if section is None or e.section == section)

    def count(self, kind: str, op: str) -> None:
        """Record one ``kind`` event of ``op`` at the caller's line (nothing while :meth:`quietly`)."""
        if not self._quiet:
            self.events.append(SyncEvent(kind, op, _caller(), self.current_section))

    @contextlib.contextmanager
    def quietly(self) -> Iterator[None]:
        """Count nothing inside the block (setup done by the counter itself, an op counted as a whole)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def to_device(self, value: Any) -> Any:
        """Put a tensor (a copy) or an ``nn.Module``'s parameters and buffers on the device, counting nothing."""
        raise NotImplementedError

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in pinned host memory (non-blocking copies from or into it do not wait)."""
        raise NotImplementedError


def _caller() -> str:
    """file:line (function) of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_TORCH_DIR) and "contextlib" not in path:
            return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{frame.lineno} ({frame.name})"
    return "?"


# ---------------------------------------------------------------------------------------------- the emulation

class EmulatedDevice(SyncCounter):
    """Device residency emulated on CPU (module docstring). Use it through :func:`emulated_device`."""

    device = EMULATED_DEVICE

    def __init__(self) -> None:
        super().__init__()
        self._device, self._pinned = _RESIDENT, _PINNED
        self.device_calls = 0  # > 0: inside a torch function with device inputs

    def is_device(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self._device

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor in self._pinned

    def mark(self, tensor: torch.Tensor, on_device: bool = True) -> torch.Tensor:
        """Declare ``tensor`` device-resident (or host-resident) without counting a copy; returns it."""
        if on_device:
            self._device[tensor] = True
        else:
            self._device.pop(tensor, None)
        return tensor

    def to_device(self, value: Any) -> Any:
        """Put a tensor (a copy, counted as nothing: a setup step) or an ``nn.Module``'s parameters and
        buffers (in place: on a GPU the weights live there) on the device; returns the value."""
        if isinstance(value, torch.nn.Module):
            for tensor in (*value.parameters(), *value.buffers()):
                self.mark(tensor)
            return value
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"to_device takes a tensor or an nn.Module, got {type(value).__name__}")
        with self.quietly():
            copy = value.clone()
        return self.mark(copy)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """Declare host ``tensor`` to be in pinned memory (a ``non_blocking`` copy from or into it does not block)."""
        self.mark(tensor, on_device=False)
        self._pinned[tensor] = True
        return tensor

    @contextlib.contextmanager
    def inside_device_call(self) -> Iterator[None]:
        """A torch function with device inputs runs: the factories its ATen ops call allocate on the device."""
        self.device_calls += 1
        try:
            yield
        finally:
            self.device_calls -= 1

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` (the result of a read back), counted as nothing."""
        with self.quietly():
            copy = tensor.clone()
        return self.mark(copy, on_device=False)

    def copied(self, dst: torch.Tensor, src: Any, non_blocking: bool) -> None:
        """Count ``dst.copy_(src)``: host to device, device to host, or neither."""
        if not isinstance(src, torch.Tensor):
            return
        if self.is_device(dst) and not self.is_device(src):
            self.count("h2d_async" if non_blocking and self.is_pinned(src) else "h2d", "copy_ (host to device)")
        elif self.is_device(src) and not self.is_device(dst):
            self.count("d2h_async" if non_blocking and self.is_pinned(dst) else "syncs", "copy_ (device to host)")


def _is_emulated(device: Any) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device == EMULATED_DEVICE


def _blocks(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` on device inputs reads device data on the host (module docstring)."""
    packet = func._overloadpacket
    if packet in _MASK_INDEXING:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None
    return packet in _ALWAYS_BLOCKING or any(tag in func.tags for tag in _BLOCKING_TAGS)


class _ResidencyDispatch(TorchDispatchMode):
    """ATen level: outputs of ops with device inputs live on the device; blocking reads and copies counted."""

    def __init__(self, emulation: EmulatedDevice):
        super().__init__()
        self.emulation = emulation

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        emu = self.emulation
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(emu.is_device(t) for t in tensors)
        name = str(func.name()).replace("aten::", "")
        if func._overloadpacket is aten.copy_:
            emu.copied(args[0], args[1], bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
            on_device = False  # the destination keeps its residency
        elif on_device and func._overloadpacket is aten.index and not emu.is_device(args[0]):
            emu.count("syncs", "index.Tensor (device indices into a host tensor: read to the host)")
            return func(*args, **kwargs)
        elif on_device:
            if _blocks(func, args, kwargs):
                emu.count("syncs", name)
            for tensor in tensors:
                if tensor.dim() > 0 and not emu.is_device(tensor):
                    emu.count("h2d", f"{name} (a host tensor used with device tensors)")
        out = func(*args, **kwargs)
        if on_device or (emu.device_calls and not tensors and func._overloadpacket is not aten.lift_fresh):
            return _mark_new(emu, out, tensors)
        return out


def _mark_new(emulation: EmulatedDevice, out: Any, inputs: list[torch.Tensor]) -> Any:
    """Mark the tensors of ``out`` that are not among ``inputs`` device-resident; returns ``out``."""
    known = {id(t) for t in inputs}
    for tensor in tree_leaves(out):
        if isinstance(tensor, torch.Tensor) and id(tensor) not in known:
            emulation.mark(tensor)
    return out


class _ResidencyFunctions(TorchFunctionMode):
    """Python level: the device a tensor reports, device targets of factories and ``.to``, reads to Python."""

    def __init__(self, emulation: EmulatedDevice):
        super().__init__()
        self.emulation = emulation

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        emu = self.emulation
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_ATTRIBUTE:
            return EMULATED_DEVICE if emu.is_device(args[0]) else func(*args, **kwargs)
        if owner is _DATA_ATTRIBUTE and func.__name__ == "__set__":  # param.data = ... (nn.Module.to)
            func(*args, **kwargs)
            emu.mark(args[0], emu.is_device(args[1]))
            return None
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.cpu:
            return self._to_host(func(*args, **kwargs), args[0], "cpu()")
        if func in _READS:
            if emu.is_device(args[0]):
                emu.count("syncs", func.__name__)
            with emu.quietly():
                return func(*args, **kwargs)
        if func in _UNITS and emu.is_device(args[0]):  # counted as on CUDA, not as its CPU decomposition
            if _UNITS[func](args, kwargs):
                emu.count("syncs", func.__name__)
            with emu.quietly(), emu.inside_device_call():
                return _mark_new(emu, func(*args, **kwargs), [args[0]])
        if func is torch.Tensor.pin_memory:
            return emu.pin(emu.host_copy(args[0]))
        if func is torch.Tensor.is_pinned:
            return emu.is_pinned(args[0])
        pinned = kwargs.pop("pin_memory", False) is True
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(emu.is_device(t) for t in inputs):  # what a composite op allocates inside is on the device too
            with emu.inside_device_call():
                out = func(*args, **kwargs)
            return _mark_new(emu, out, inputs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            target = kwargs.get("device", None if func is not torch.Tensor.new_tensor else
                                EMULATED_DEVICE if emu.is_device(args[0]) else None)
            if _is_emulated(target):
                out = self._placed(func, args, out)
            if pinned:
                emu.pin(out)
        return out

    def _placed(self, func, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """A factory's result with a device target: a device tensor (a copy when made from host data)."""
        emu = self.emulation
        if func in _FROM_DATA:
            source = args[1] if func is torch.Tensor.new_tensor else args[0] if args else None
            if emu.is_device(source):
                return out
            emu.count("h2d", f"{func.__name__}(data, device=...)")
            if isinstance(source, torch.Tensor) and out is source:
                out = emu.host_copy(source)
        return emu.mark(out)

    def _to(self, func, args: tuple, kwargs: dict):
        emu = self.emulation
        tensor, rest = args[0], args[1:]
        if rest and isinstance(rest[0], torch.Tensor):
            target_on_device, non_blocking = emu.is_device(rest[0]), bool(kwargs.get("non_blocking", False))
        else:
            device, _, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
            target_on_device = None if device is None else _is_emulated(device)
        out = func(*args, **kwargs)
        if target_on_device is None or target_on_device == emu.is_device(tensor):
            return out
        if not target_on_device:
            return self._to_host(out, tensor, ".to(host)", non_blocking)
        emu.count("h2d_async" if non_blocking and emu.is_pinned(tensor) else "h2d", ".to(device)")
        if out is tensor:
            out = emu.host_copy(tensor)
        return emu.mark(out)

    def _to_host(self, out: torch.Tensor, tensor: torch.Tensor, op: str, non_blocking: bool = False) -> torch.Tensor:
        emu = self.emulation
        if not emu.is_device(tensor):
            return out
        emu.count("d2h_async" if non_blocking else "syncs", op)
        return emu.host_copy(out) if out is tensor else emu.mark(out, on_device=False)


def current_emulation() -> EmulatedDevice | None:
    """The emulation active in this thread (None outside :func:`emulated_device`)."""
    return getattr(_ACTIVE, "emulation", None)


@contextlib.contextmanager
def emulated_device() -> Iterator[EmulatedDevice]:
    """Inside the block, device residency is emulated and its syncs and copies counted (module docstring)."""
    if current_emulation() is not None:
        raise RuntimeError("emulated_device() blocks do not nest")
    emulation = EmulatedDevice()
    _ACTIVE.emulation = emulation
    try:
        with _ResidencyFunctions(emulation), _ResidencyDispatch(emulation):
            yield emulation
    finally:
        _ACTIVE.emulation = None


# ---------------------------------------------------------------------------------------------- real CUDA

class CudaSyncCounter(SyncCounter):
    """Real syncs on CUDA: the warnings of ``set_sync_debug_mode("warn")``, attributed to the op that raised
    them; a blocking host-to-device copy is counted as ``h2d``, not as a sync. Use :func:`sync_counter`."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self._records: list = []
        self._seen = 0

    def to_device(self, value: Any) -> Any:
        with self.quietly():
            return value.to(self.device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def switch(self, name: str) -> None:
        self.collect("synchronize")
        super().switch(name)

    def collect(self, op: str, kind: str | None = "syncs") -> None:
        """Count the sync warnings raised since the last call as ``kind`` events of ``op`` (None: drop them)."""
        new = [r for r in self._records[self._seen:] if SYNC_MESSAGE in str(r.message)]
        self._seen = len(self._records)
        for _ in new if kind is not None else ():
            self.count(kind, op)

    def counts(self, section: str | None = None) -> Counts:
        self.collect("synchronize")
        return super().counts(section)


class _CudaCopies(TorchDispatchMode):
    """Attributes each sync warning to its ATen op, and a host-to-device copy's to ``h2d`` / ``h2d_async``."""

    def __init__(self, counter: CudaSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        counter.collect("synchronize")  # anything since the last op (torch.cuda.synchronize, events)
        out = func(*args, **kwargs)
        name = str(func.name()).replace("aten::", "")
        if func._overloadpacket is aten.copy_:
            source, target = args[1], args[0]
            non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        elif func._overloadpacket is aten._to_copy:
            source, target, non_blocking = args[0], out, bool(kwargs.get("non_blocking", False))
        else:
            source = target = None
        if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) and source.is_cuda != target.is_cuda:
            if target.is_cuda:  # host to device: the copy's own wait is the copy
                counter.collect(name, kind=None)
                counter.count("h2d_async" if non_blocking and source.is_pinned() else "h2d", name)
                return out
            if non_blocking and target.is_pinned():
                counter.count("d2h_async", name)
        counter.collect(name)
        return out


@contextlib.contextmanager
def sync_counter(device: torch.device | str = "cpu") -> Iterator[SyncCounter]:
    """Count syncs and copies in the block: :func:`emulated_device` for a CPU device, the real ones on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        with emulated_device() as emulation:
            yield emulation
        return
    counter = CudaSyncCounter(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        counter._records = records
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with _CudaCopies(counter):
                yield counter
            counter.collect("synchronize")
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for record in records:  # the block's other warnings, issued again
        if SYNC_MESSAGE not in str(record.message):
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)


# ---------------------------------------------------------------------------------------------- reading late

class LaggedRead:
    """A small device value read on the host late, without ever waiting.

    ``request(t)`` starts a non-blocking copy of ``t`` (shaped and typed like ``like``) into one of ``slots``
    host buffers in turn (pinned on a machine with CUDA, emulated-pinned under :func:`emulated_device`) and,
    on CUDA, records an event after it; ``latest()`` returns a host tensor holding the newest copy that has
    completed (``event.query()``, never ``synchronize``), or None before any has. Off CUDA a copy completes
    at once. A host running ahead of the GPU keeps up to ``slots`` copies in flight, so the newest completed
    one is still found; past that, the oldest buffer is reused (its copy, still queued, is superseded).
    """

    def __init__(self, like: torch.Tensor, slots: int = 4):
        emulation = current_emulation()
        pinned = emulation is None and torch.cuda.is_available()
        self.buffers = [torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pinned)
                        for _ in range(slots if like.is_cuda else 1)]
        if emulation is not None:
            for buffer in self.buffers:
                emulation.pin(buffer)
        self.on_cuda = like.is_cuda
        self.events = [torch.cuda.Event() for _ in self.buffers] if like.is_cuda else None
        self._requests = 0  # copies started; slot of request k: k % slots
        self._seen = 0  # copies whose completion has been checked (all before it completed)
        self._value: torch.Tensor | None = None

    @property
    def buffer(self) -> torch.Tensor:
        """The host buffer the next copy goes to."""
        return self.buffers[self._requests % len(self.buffers)]

    def request(self, tensor: torch.Tensor) -> None:
        """Start copying ``tensor`` to the host."""
        buffer = self.buffer
        if tensor.shape != buffer.shape or tensor.dtype != buffer.dtype:
            raise ValueError(f"LaggedRead holds {tuple(buffer.shape)} {buffer.dtype}, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        buffer.copy_(tensor, non_blocking=True)
        if self.events is not None:
            self.events[self._requests % len(self.events)].record()
        self._requests += 1
        self._seen = max(self._seen, self._requests - len(self.buffers))  # older copies were superseded

    def latest(self) -> torch.Tensor | None:
        """The newest completed copy (a host tensor), or None before any has completed; never waits."""
        newest = None
        for k in range(self._seen, self._requests):  # in stream order: stop at the first one still in flight
            if self.events is not None and not self.events[k % len(self.events)].query():
                break
            newest = k
        if newest is not None:
            self._value = self.buffers[newest % len(self.buffers)].clone()
            self._seen = newest + 1
        return self._value


# ---------------------------------------------------------------------------------------------- per step

@dataclass
class SamplingCounts:
    """A sampling run's counts: ``setup`` (checks and ``start()``, before the first step; ``start`` is the
    part inside ``Sampler.start``), the loop's total and its per-step mean, the events and the sampler's stats."""

    setup: Counts
    start: Counts
    loop: Counts
    steps: int
    events: list[SyncEvent] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # the sampler's ``stats`` after the counted run

    @property
    def per_step(self) -> Counts:
        return self.loop.per(self.steps)


def count_sampling(counter: SyncCounter, sampler: Any, noise: torch.Tensor, warmup: bool = True,
                   **sample_kwargs: Any) -> SamplingCounts:
    """Run ``sampler.sample(noise, **sample_kwargs)`` inside ``counter``, split into setup and steps.

    The loop starts when ``sampler.start()`` returns; a step is one ``sampler.step()`` call (Heun's two
    stages are two). With ``warmup`` a first, uncounted run fills the sampler's caches (device tables,
    segment graphs: once per sampler, as before a graph capture). The sampler's methods are wrapped for
    the counted run only.
    """
    if warmup:
        with counter.section("warmup"):
            sampler.sample(noise, **sample_kwargs)
    steps = 0
    start, step = sampler.start, sampler.step

    def counted_start(*args: Any, **kwargs: Any):
        with counter.section("start"):
            state = start(*args, **kwargs)
        counter.switch("loop")
        return state

    def counted_step(*args: Any, **kwargs: Any):
        nonlocal steps
        steps += 1
        return step(*args, **kwargs)

    first = len(counter.events)
    sampler.start, sampler.step = counted_start, counted_step
    try:
        with counter.section("setup"):
            sampler.sample(noise, **sample_kwargs)
    finally:
        del sampler.start, sampler.step
    events = counter.events[first:]
    totals = {name: _sum(e for e in events if e.section == name) for name in ("setup", "start", "loop")}
    return SamplingCounts(totals["setup"] + totals["start"], totals["start"], totals["loop"], steps, events,
                          dict(getattr(sampler, "stats", None) or {}))


def count_calls(counter: SyncCounter, fn: Callable[[int], Any], calls: int,
                warmup: int = 1) -> tuple[Counts, list[SyncEvent]]:
    """Counts per call of ``fn(i)`` over ``calls`` calls after ``warmup`` uncounted ones (e.g. stream ticks),
    and the counted events."""
    for i in range(warmup):
        with counter.section("warmup"):
            fn(i)
    first = len(counter.events)
    with counter.section("calls"):
        for i in range(warmup, warmup + calls):
            fn(i)
    events = [e for e in counter.events[first:] if e.section == "calls"]
    return _sum(events).per(calls), events


def _sum(events) -> Counts:
    total = Counts()
    for event in events:
        setattr(total, event.kind, getattr(total, event.kind) + 1)
    return total


def is_device_resident(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host would wait for a device: a CUDA tensor, or one that
    :func:`emulated_device` treats as living on the GPU."""
    emulation = current_emulation()
    return tensor.is_cuda or (emulation is not None and emulation.is_device(tensor))
