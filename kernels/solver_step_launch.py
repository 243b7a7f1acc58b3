"""Launcher of the fused solver step: checks, allocation, backend choice, stream, launch.

``solver_step(x, cond, uncond, history, noise, table, itable, step, out=None, backend="auto")``
computes, elementwise (the spec and its formula: kernels/solver_step.py),

    x0  = clamp(pc*cond + pu*uncond + px*x, lo, hi)       (rounded to x's dtype)
    o_k = a_k*x + b_k*x0 + cc_k*cond + cu_k*uncond + d_k*noise[nidx] + sum_j w_kj*history[j]

from row ``step`` of ``table`` / ``itable``; it returns ``out`` (= o_0) and writes o_k (k >= 1)
to history slot ``itable[step, 1+k]`` where that is >= 0.

Shapes and dtypes:
    x, out           [*shape], storage dtype fp32 / fp16 / bf16 (out may be x: in place)
    cond, uncond     [*shape], fp32 / fp16 / bf16 (one dtype for both; uncond may be None)
    history          [S, *shape] storage dtype, or None (S = 0); updated in place
    noise            [n_noise, *shape] storage dtype, or None
    table            fp32 [steps, 5 + n_out*(5 + S)];  itable int32 [steps, 1 + n_out]
    step             int64, 0-dim, on x's device (read on the device: no host sync)

All tensors live on one device. Non-contiguous x / cond / uncond / noise / table / itable are
copied to contiguous memory first; ``out`` and ``history`` are written, so they must be
contiguous already. Backends: "reference" (PyTorch), "cpu" (C++/OpenMP), "cuda"; "auto"
takes the compiled kernel for the tensors' device and otherwise the reference, with a logged
reason (see :mod:`diffrt.kernels.registry`, and ``registry.explain("solver_step", ...)``).
"""
from __future__ import annotations

import torch

from . import registry
from .solver_step import solver_step_reference, table_width

OP = "solver_step"

# dtype codes of csrc/solver_step.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _features(x, cond, uncond, history, noise, table, itable, step, out=None) -> dict:
    """What the backends' predicates (and the choice cache) look at."""
    return {"device": x.device.type, "index": x.device.index, "dtype": str(x.dtype).replace("torch.", ""),
            "model_dtype": str(cond.dtype).replace("torch.", ""), "slots": 0 if history is None else history.shape[0]}


def _compiled_problem(features: dict) -> str | None:
    module, problem = registry.native()
    if module is None:
        return problem
    if features["slots"] > module.MAX_SLOTS:
        return f"history has {features['slots']} slots; the compiled kernels keep at most {module.MAX_SLOTS}"
    return None


def _cuda_problem(features: dict) -> str | None:
    return _compiled_problem(features) or registry.cuda_problem(features["index"] or 0)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check(x, cond, uncond, history, noise, table, itable, step, out) -> None:
    """Raise TypeError / ValueError with the offending shapes, dtypes or devices."""
    for name, t in (("x", x), ("cond", cond), ("table", table), ("itable", itable), ("step", step)):
        if not torch.is_tensor(t):
            raise TypeError(f"solver_step: {name} must be a tensor, got {type(t).__name__}")
    tensors = {"x": x, "cond": cond, "uncond": uncond, "history": history, "noise": noise, "table": table,
               "itable": itable, "step": step, "out": out}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"solver_step: {name} is on {t.device} but x is on {x.device}; put all tensors on one device")
    supported = ", ".join(str(d).replace("torch.", "") for d in DTYPE_CODES)
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"solver_step: x has dtype {x.dtype}; supported storage dtypes: {supported}")
    for name in ("cond", "uncond"):
        t = tensors[name]
        if t is None:
            continue
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"solver_step: {name} has dtype {t.dtype}; supported model dtypes: {supported}")
        if t.shape != x.shape:
            raise ValueError(f"solver_step: {name} has shape {_shape(t)}, x has {_shape(x)}; they must match")
    if uncond is not None and uncond.dtype != cond.dtype:
        raise TypeError(f"solver_step: cond is {cond.dtype} but uncond is {uncond.dtype}; use one dtype")
    for name, t in (("history", history), ("noise", noise)):
        if t is None:
            continue
        if t.dim() != x.dim() + 1 or t.shape[1:] != x.shape:
            raise ValueError(f"solver_step: {name} has shape {_shape(t)}; expected [n, *x.shape] = [n, {', '.join(map(str, x.shape))}]")
        if t.dtype != x.dtype:
            raise TypeError(f"solver_step: {name} has dtype {t.dtype}; it must have x's dtype {x.dtype}")
    if history is not None and not history.is_contiguous():
        raise ValueError(f"solver_step: history {_shape(history)} must be contiguous (it is updated in place)")
    if table.dtype != torch.float32 or table.dim() != 2:
        raise TypeError(f"solver_step: table must be a 2-D float32 tensor, got {table.dtype} {_shape(table)}")
    if itable.dtype != torch.int32 or itable.dim() != 2:
        raise TypeError(f"solver_step: itable must be a 2-D int32 tensor, got {itable.dtype} {_shape(itable)}")
    n_out, slots = itable.shape[1] - 1, 0 if history is None else history.shape[0]
    if n_out < 1 or itable.shape[0] != table.shape[0]:
        raise ValueError(f"solver_step: itable has shape {_shape(itable)}, table {_shape(table)}; expected [steps, 1 + n_out] "
                         "with n_out >= 1 and the same number of steps")
    if table.shape[1] != table_width(n_out, slots):
        raise ValueError(f"solver_step: table has {table.shape[1]} columns; {n_out} outputs and {slots} history slots "
                         f"need 5 + n_out*(5 + S) = {table_width(n_out, slots)}")
    if n_out > 1 and history is None:
        raise ValueError(f"solver_step: itable has {n_out} outputs; outputs k >= 1 go to history slots, so history is needed")
    if step.dtype != torch.int64 or step.dim() != 0:
        raise TypeError(f"solver_step: step must be a 0-dim int64 tensor, got {step.dtype} {_shape(step)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"solver_step: out must be contiguous with x's shape {_shape(x)} and dtype {x.dtype}; "
                         f"got {_shape(out)} {out.dtype}{'' if out.is_contiguous() else ' non-contiguous'}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _native_args(x, cond, uncond, history, noise, table, itable, step, out) -> tuple:
    return (x.data_ptr(), cond.data_ptr(), _ptr(uncond), _ptr(history), _ptr(noise), out.data_ptr(), table.data_ptr(),
            itable.data_ptr(), step.data_ptr(), x.numel(), table.shape[0], 0 if noise is None else noise.shape[0],
            itable.shape[1] - 1, 0 if history is None else history.shape[0], DTYPE_CODES[x.dtype], DTYPE_CODES[cond.dtype])


def _run_reference(x, cond, uncond, history, noise, table, itable, step, out):
    return solver_step_reference(x, cond, uncond, history, noise, table, itable, step, out=out)


def _run_cpu(x, cond, uncond, history, noise, table, itable, step, out):
    module, _ = registry.native()
    module.solver_step_cpu(*_native_args(x, cond, uncond, history, noise, table, itable, step, out),
                           torch.get_num_threads())
    return out


def _run_cuda(x, cond, uncond, history, noise, table, itable, step, out):
    module, _ = registry.native()
    args = _native_args(x, cond, uncond, history, noise, table, itable, step, out)
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            module.solver_step_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        module.solver_step_cuda(*args, torch.cuda.current_stream().cuda_stream)
    return out


registry.add_op(OP, _features)
registry.register(OP, "cuda", _run_cuda, _cuda_problem, priority=0, devices=("cuda",))
registry.register(OP, "cpu", _run_cpu, _compiled_problem, priority=10, devices=("cpu",))
registry.register(OP, "reference", _run_reference, lambda features: None, priority=100)


def solver_step(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, history: torch.Tensor | None,
                noise: torch.Tensor | None, table: torch.Tensor, itable: torch.Tensor, step: torch.Tensor,
                out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One fused solver step (formula and shapes: the module docstring); returns ``out``.

    ``backend``: "auto", "reference", "cpu" or "cuda"; a forced backend that cannot serve the
    call raises :class:`~diffrt.kernels.registry.BackendUnavailable` with the reason. A step
    index outside the table, a noise index past ``noise`` or a slot past ``history`` raises
    (reference, cpu) or, on CUDA where the device cannot raise, fills ``out`` with NaN.
    """
    _check(x, cond, uncond, history, noise, table, itable, step, out)
    chosen = registry.choose_for(OP, _features(x, cond, uncond, history, noise, table, itable, step), backend)
    x, cond, table, itable = x.contiguous(), cond.contiguous(), table.contiguous(), itable.contiguous()
    uncond = None if uncond is None else uncond.contiguous()
    noise = None if noise is None else noise.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return chosen.run(x, cond, uncond, history, noise, table, itable, step, out)


def _copies(scaled: torch.Tensor, numel: int) -> int:
    """How many copies of a [numel] sample the buffer ``scaled`` holds."""
    copies, rest = divmod(scaled.numel(), numel) if numel else (0, 1)
    if copies < 1 or rest:
        raise ValueError(f"solver_step: scaled has shape {_shape(scaled)}; it must hold whole copies of x "
                         f"({numel} elements)")
    return copies


class PreparedStep:
    """A solver step checked and dispatched once, for a caller that steps the same buffers many times: calling
    it with tensors of the prepared shape, dtypes and device (contiguous) runs the chosen backend directly;
    anything else goes through :func:`solver_step` (and its checks). ``history``, ``noise``, ``table``,
    ``itable`` and ``step`` must be the tensors it was prepared with (the caller's own buffers).

    On the compiled backends the call passes the prepared buffers' pointers straight to the kernel: what is
    left per call is comparing the four tensors with the prepared key and reading their pointers (a few
    microseconds of host time; see ``bench/bench_sampler.py``)."""

    def __init__(self, x, cond, uncond, history, noise, table, itable, step, out, backend: str = "auto"):
        _check(x, cond, uncond, history, noise, table, itable, step, out)
        features = _features(x, cond, uncond, history, noise, table, itable, step)
        chosen = registry.choose_for(OP, features, backend)
        self._run = chosen.run
        self._backend = backend
        self._shape, self._dtype, self._model_dtype = x.shape, x.dtype, cond.dtype
        self._device_index, self._numel = x.get_device(), x.numel()  # get_device: -1 on the CPU
        self._guided = uncond is not None
        table, itable = table.contiguous(), itable.contiguous()
        self._buffers = (history, noise, table, itable, step)
        # the kernel arguments after (x, cond, uncond): history, noise, [out], table, itable, step, sizes, dtypes
        self._native = None
        if chosen.name in ("cpu", "cuda"):
            module, _ = registry.native()
            args = _native_args(x, cond, uncond, history, noise, table, itable, step, out)
            self._native = (module.solver_step_cpu if chosen.name == "cpu" else module.solver_step_cuda,
                            chosen.name == "cuda", args[3:5], args[6:])

    def _matches(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, out: torch.Tensor,
                 scaled: torch.Tensor | None = None) -> bool:
        """Whether the tensors have the prepared layout (each attribute read once: this runs every step)."""
        shape, dtype, model_dtype, index = self._shape, self._dtype, self._model_dtype, self._device_index
        if (x.shape != shape or x.dtype != dtype or x.get_device() != index or not x.is_contiguous()
                or cond.shape != shape or cond.dtype != model_dtype or cond.get_device() != index
                or not cond.is_contiguous() or (uncond is not None) != self._guided):
            return False
        if out is not x and (out.shape != shape or out.dtype != dtype or out.get_device() != index
                             or not out.is_contiguous()):
            return False
        if scaled is not None and (scaled.dtype != dtype or scaled.get_device() != index or not scaled.is_contiguous()):
            return False
        return uncond is None or (uncond.shape == shape and uncond.dtype == model_dtype
                                  and uncond.get_device() == index and uncond.is_contiguous())

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, out: torch.Tensor,
                 scaled: torch.Tensor | None = None, scale: float = 1.0, advance: bool = False) -> torch.Tensor:
        """The step into ``out``; then, optionally, ``scaled`` = out * scale (the next model input, rounded as
        ``out * scale`` rounds), and the step index + 1. ``scaled`` is a buffer apart from ``out`` holding one
        or more copies of it along the first dimension ([2B, ...] for a CFG batch [x; x]; B = x.shape[0]).
        The C++ kernel does both inside its call (no extra op); the other backends run torch ops after the step."""
        copies = 0 if scaled is None else _copies(scaled, self._numel)
        native = self._native
        if native is not None and not native[1] and self._matches(x, cond, uncond, out, scaled):
            kernel, _, buffers, rest = native
            kernel(x.data_ptr(), cond.data_ptr(), 0 if uncond is None else uncond.data_ptr(), *buffers, out.data_ptr(),
                   *rest, torch.get_num_threads(), 0 if scaled is None else scaled.data_ptr(), scale, copies, advance)
            return out
        self._step(x, cond, uncond, out)
        if scaled is not None:
            torch.mul(out.expand(copies, *out.shape), scale, out=scaled.view(copies, *out.shape))
        if advance:
            self._buffers[4].add_(1)
        return out

    def _step(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, out: torch.Tensor) -> None:
        if not self._matches(x, cond, uncond, out):
            history, noise, table, itable, step = self._buffers
            solver_step(x, cond, uncond, history, noise, table, itable, step, out=out, backend=self._backend)
            return
        if self._native is None:
            self._run(x, cond, uncond, *self._buffers, out)
            return
        kernel, on_cuda, buffers, rest = self._native
        pointers = (x.data_ptr(), cond.data_ptr(), 0 if uncond is None else uncond.data_ptr(), *buffers, out.data_ptr())
        if not on_cuda:
            kernel(*pointers, *rest, torch.get_num_threads())
        elif x.device.index is not None and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                kernel(*pointers, *rest, torch.cuda.current_stream().cuda_stream)
        else:
            kernel(*pointers, *rest, torch.cuda.current_stream().cuda_stream)
