"""``optimize(den, ...)``: the same denoiser, with diffrt's kernels inside.

    fast = optimize(den, attention="auto", todo=None, sparse=None)
    fast(x, t, cond)                     # the Denoiser's call signature; Sampler(fast, ...) works as with den

What it does now (later options arrive with their issues and raise NotImplementedError until then):

* ``attention``: the attention of every attention module runs through :func:`diffrt.kernels.attention`
  (processors from :mod:`diffrt.runtime.attention`); ``"auto"`` takes the Triton kernel on CUDA and
  PyTorch's SDPA elsewhere, or name a backend ("triton", "torch", "reference"); None leaves the
  model's attention alone.
* ``todo``: ToDo key/value downsampling in self-attention. ``True`` or an int f: factor f (2 by
  default) on level 0, the model's highest-resolution grid, where it has >= 4096 tokens (the
  paper's default); a :class:`~diffrt.runtime.attention.ToDo` picks levels, factors, the token
  threshold and the mode. Changes the samples: measure with :mod:`diffrt.runtime.quality`.
* ``sparse``: block-sparse self-attention, a :class:`~diffrt.runtime.attention.Sparse` (local
  window or dynamic selection). Changes the samples too.
* ``int8``: W8A8 linears and 1x1 convs on INT8 kernels. A :class:`~diffrt.export.Calibration`
  (or the path it was saved to) gives activation scales per timestep group: each sample's rows use
  its own group's scale (found on the device from its timestep), and a sampler whose plan is not
  the calibrated one is refused. ``int8="dynamic"`` quantizes per token instead (no calibration;
  the policy's layers). ``int8_policy`` (a :class:`~diffrt.export.QuantPolicy`) picks the layers
  for "dynamic"; a calibration names its own.
* ``dtype``: the compute dtype; a model in another dtype is copied and converted (the original
  keeps its own), one already in it is shared.
* ``step_cache``: first-block caching for DiT-style transformers (:mod:`diffrt.runtime.step_cache`):
  ``True`` or a threshold on the relative change of the first block's residual; the later blocks
  are skipped while it stays below. Changes the samples.
* ``cuda_graphs``: the model call is captured in a CUDA graph per shape bucket and replayed
  (:func:`~diffrt.runtime.graphs.graph_denoiser` with power-of-two batch buckets, so adaptive
  guidance's shrinking batches replay a few graphs); off CUDA the call runs eagerly (logged once).
  Not with a step cache (it decides on the host per call) nor an engine backend (engines replay
  their own graphs).
* ``config``: an :class:`~diffrt.runtime.acceleration.Acceleration` (or the JSON ``diffrt tune``
  wrote, or its dict): it sets ``dtype``, ``attention``, ``todo``, ``sparse``, ``int8``,
  ``step_cache`` and ``cuda_graphs`` (the arguments of the same names are ignored); its solver-side
  part goes to ``Acceleration.sampler(fast, ...)``.
* ``backend``: "native" (PyTorch with diffrt's kernels: an :class:`OptimizedDenoiser`),
  "onnxruntime" or "tensorrt": the optimized denoiser exported to ONNX (with its calibration as
  QDQ nodes) and run by that engine (:mod:`diffrt.export.backends`; ``backend_options`` go there:
  the cache folder, TensorRT's batch and resolution ranges, ...). The result has the Denoiser's
  call signature, so the Sampler runs it unchanged.

The processors are installed into the model in place but dispatch on the caller: the returned
:class:`OptimizedDenoiser` turns them on for its own calls only, so ``den`` keeps producing its
original outputs from the same weights (useful for quality comparisons). ``fast.layers`` lists the
attention layers found; ``fast.describe()`` says what was installed.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch

from . import attention as attn
from . import context
from .denoiser import Denoiser

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "triton", "torch", "reference")
BACKENDS = ("native", "onnxruntime", "tensorrt")


class OptimizedDenoiser(Denoiser):
    """A :class:`Denoiser` whose calls run diffrt's attention (see :func:`optimize`)."""

    def __init__(self, base: Denoiser, model: Any, settings: attn.AttentionSettings | None,
                 layers: list[attn.Layer], dtype: torch.dtype | None, calibration: Any = None,
                 int8_mode: str | None = None, int8_weights: dict | None = None, step_cache: Any = None):
        super().__init__(model, base.schedule, sample_shape=base.sample_shape, call=base._call, dtype=dtype)
        self.base = base
        self.settings = settings
        self.layers = layers
        self.calibration = calibration
        self.int8_mode = int8_mode
        self.int8_weights = int8_weights or {}  # {module: W8A8Weights}
        self.step_cache = step_cache  # a diffrt.runtime.step_cache.StepCache, or None
        names = {module: name for name, module in model.named_modules()} if self.int8_weights else {}
        self.int8_layers = [names[module] for module in self.int8_weights]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if not self.has_switches:
            return super().__call__(x, t, cond)
        with context.switches(**self.call_switches(x, t)):
            return super().__call__(x, t, cond)

    @property
    def has_switches(self) -> bool:
        """Whether :meth:`call_switches` turns anything on (else a call is the model's own, given its dtype)."""
        return self.step_cache is not None or self.settings is not None or self.int8_mode is not None

    def call_switches(self, x: torch.Tensor, t: Any) -> dict[str, Any]:
        """The call-context switches of a model call on sample x [B, ...] at timesteps t: only what this
        variant turns on (an enclosing call's others stay)."""
        switches: dict[str, Any] = {}
        if self.step_cache is not None:
            switches["step_cache"] = self.step_cache
        if self.settings is not None:
            switches["attention"] = (self.settings, tuple(x.shape[-2:]) if x.dim() >= 4 else None)
        if self.int8_mode is not None:
            t_rows = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
            groups = self.calibration.groups_of(t_rows) if self.int8_mode == "static" else None
            switches["int8"] = (groups, self.int8_mode, self.int8_weights)
        return switches

    def reset_cache(self) -> None:
        """Forget the step cache's trajectory (the Sampler calls this at the start of each sample)."""
        if self.step_cache is not None:
            self.step_cache.reset()

    def check_plan(self, plan) -> None:
        """Refuse a solver plan the INT8 calibration was not made for (the Sampler calls this)."""
        if self.calibration is not None:
            self.calibration.check_plan(plan)

    def describe(self) -> str:
        """What optimize() installed, one line per attention layer."""
        s = self.settings
        lines = [f"OptimizedDenoiser({type(self.model).__name__}, dtype={self.dtype}, attention="
                 f"{None if s is None else s.backend!r}, todo={None if s is None else s.todo}, "
                 f"sparse={None if s is None else s.sparse})"]
        lines += [f"  {layer.name}: {layer.kind}-attention, {layer.heads} heads x {layer.head_dim}" for layer in self.layers]
        if self.int8_mode is not None:
            groups = f", {self.calibration.groups} timestep groups" if self.calibration is not None else ""
            lines.append(f"  int8 ({self.int8_mode}{groups}): {len(self.int8_layers)} layers W8A8")
        return "\n".join(lines)


def _todo_config(todo: Any) -> attn.ToDo | None:
    if todo is None or todo is False:
        return None
    if todo is True:
        return attn.ToDo()
    if isinstance(todo, attn.ToDo):
        return todo
    if isinstance(todo, int) and todo >= 1:
        return attn.ToDo(factor=todo)
    raise TypeError(f"todo must be None, True, an int factor >= 1 or a diffrt.runtime.attention.ToDo; got {todo!r}")


def optimize(den: Denoiser, dtype: torch.dtype | None = None, attention: str | None = "auto", todo: Any = None,
             sparse: attn.Sparse | None = None, int8: Any = None, cuda_graphs: bool = False,
             backend: str = "native", int8_policy: Any = None,
             backend_options: dict[str, Any] | None = None, step_cache: float | bool | None = None,
             config: Any = None) -> Denoiser:
    """An :class:`OptimizedDenoiser` of ``den`` (module docstring for the options)."""
    if not isinstance(den, Denoiser):
        raise TypeError(f"optimize takes a Denoiser (Denoiser.from_diffusers(...), models.load(...)), got "
                        f"{type(den).__name__}")
    if config is not None:
        from .acceleration import resolve  # noqa: PLC0415

        acc, base_dir = resolve(config)
        return optimize(den, backend=backend, int8_policy=int8_policy, backend_options=backend_options,
                        cuda_graphs=acc.cuda_graphs and acc.early_exit is None,  # early exit captures its segments
                        **acc.optimize_kwargs(den.device or "cpu", base_dir))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float16, torch.bfloat16, torch.float32) or None, got "
                        f"{dtype!r}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {type(cuda_graphs).__name__} {cuda_graphs!r}")
    if cuda_graphs and backend != "native":
        raise NotImplementedError(f"cuda_graphs=True with backend={backend!r}: the engine replays its own graphs")
    if cuda_graphs and step_cache not in (None, False):
        raise ValueError("cuda_graphs=True and step_cache do not compose: the cache decides on the host per call, "
                         "a graph replays fixed kernels; use one of them")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if attention is not None and attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be None or one of {', '.join(ATTENTION_BACKENDS)}; got {attention!r}")
    if sparse is not None and not isinstance(sparse, attn.Sparse):
        raise TypeError(f"sparse must be None or a diffrt.runtime.attention.Sparse, got {type(sparse).__name__}")
    todo_config = _todo_config(todo)
    if attention is None and (todo_config is not None or sparse is not None):
        raise ValueError("todo and sparse run inside diffrt's attention: leave attention='auto' (or name a backend)")

    calibration, int8_mode = _int8_request(den, int8)
    model = den.model
    precision, dtype = (dtype, None) if backend != "native" else (None, dtype)  # engines pick precision at build
    if dtype is not None and dtype != den.dtype:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"dtype={dtype} needs an nn.Module to convert; the model is {type(model).__name__}")
        model = copy.deepcopy(model).to(dtype)
        log.info("optimize: converted a copy of the model to %s", dtype)
    settings, layers = None, []
    if attention is not None:
        layers = attn.install(model) if isinstance(model, torch.nn.Module) else []
        if not layers:
            message = f"{type(model).__name__} has no attention layers diffrt can run"
            if todo_config is not None or sparse is not None or attention != "auto":
                raise ValueError(f"{message}; attention={attention!r}, todo and sparse need them")
            log.info("optimize: %s; attention left as it is", message)
        else:
            settings = attn.AttentionSettings(attention, todo_config, sparse)
            log.info("optimize: diffrt attention in %d layers (%s), todo=%s, sparse=%s", len(layers), attention,
                     todo_config, sparse)
    int8_weights = _install_int8(model, calibration, int8_mode, int8_policy)
    cache = _step_cache(model, step_cache)
    if cache is not None and backend != "native":
        raise NotImplementedError(f"step_cache decides on the host per call: not with backend={backend!r}")
    fast = OptimizedDenoiser(den, model, settings, layers, dtype or den.dtype, calibration, int8_mode, int8_weights,
                             cache)
    if backend == "native":
        if cuda_graphs:
            from .graphs import graph_denoiser  # noqa: PLC0415

            return graph_denoiser(fast, pad_batches=True)
        return fast
    if int8_mode == "dynamic":
        raise NotImplementedError(f"backend={backend!r} runs INT8 from a calibration (constant scales), not 'dynamic'")
    from diffrt.export import backends  # noqa: PLC0415 - onnx / onnxruntime / tensorrt load on first use

    return backends.build(backend, fast, calibration, precision=precision, **(backend_options or {}))


DEFAULT_STEP_CACHE = 0.05  # relative change of the first block's residual


def _step_cache(model: Any, option: float | bool | None):
    """A StepCache for ``optimize(step_cache=...)``: None / False (off), True (the default threshold) or a threshold."""
    if option is None or option is False:
        return None
    from . import step_cache as caching  # noqa: PLC0415

    if not (option is True or (isinstance(option, (int, float)) and not isinstance(option, bool))):
        raise TypeError(f"step_cache must be None, True or a threshold (a number >= 0), got {option!r}")
    threshold = DEFAULT_STEP_CACHE if option is True else float(option)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"step_cache must be a finite, non-negative threshold, got {option!r}")
    caching.install(model)
    return caching.StepCache(threshold)


def _int8_request(den: Denoiser, int8: Any) -> tuple[Any, str | None]:
    """(calibration or None, mode "static" / "dynamic" / None) for ``optimize(int8=...)``; checks the model."""
    if int8 is None:
        return None, None
    from diffrt.export import Calibration  # noqa: PLC0415

    if int8 == "dynamic":
        return None, "dynamic"
    if isinstance(int8, (str, Path)):
        int8 = Calibration.load(int8)
    if not isinstance(int8, Calibration):
        raise TypeError(f"int8 must be a Calibration, its path or 'dynamic'; got {type(int8).__name__}")
    if not isinstance(den.model, torch.nn.Module):
        raise TypeError("int8 needs an nn.Module model")
    int8.check_model(den.model)
    return int8, "static"


def _install_int8(model: Any, calibration: Any, mode: str | None, policy: Any) -> dict:
    """{module: W8A8Weights} of the layers to run in INT8 (patched to dispatch)."""
    if mode is None:
        return {}
    from diffrt.export import QuantPolicy, quant  # noqa: PLC0415

    if calibration is not None:
        layer_scales = calibration.layer_scales()
    else:
        layer_scales = {name: (torch.ones(1), None) for name in (policy or QuantPolicy()).select(model)}
    weights = quant.install(model, layer_scales)
    log.info("optimize: %d layers W8A8 (%s)", len(weights), mode)
    return weights
