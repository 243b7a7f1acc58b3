"""INT8 calibration per timestep group: ``calibrate(den, sampler_options, ...) -> Calibration``.

Runs the full-precision sampler over a calibration set (conditions x seeds; with CFG the batch
holds the unconditional branch too, and ``guidance_scales`` may add unguided runs), and records
at every step of the plan each quantized layer's input statistics: the per-channel max |x| [K]
and a seeded subsample of (|x|, channel) pairs. Then

* **groups**: ``groups=1`` one shared set of scales; ``groups="steps"`` one per step; an int G
  splits the steps into G contiguous groups of near-equal size; ``"auto"`` merges neighbouring
  steps while every layer's max |x| within the group stays within a factor ``1 + tolerance``;
* **scales** per (layer, group), from the group's statistics: ``"max"`` (max |x| / 127),
  ``"percentile"`` (the ``percentile``-th |x| / 127) or ``"mse"`` (the clipping c in
  [0.3, 1] x max minimising the subsample's quantization MSE, c / 127);
* **SmoothQuant** (``smoothquant=alpha``): per input channel s_k = max|X_k|^alpha / max|W_k|^(1-alpha)
  over all steps; activations are divided by s (``inv_smooth`` = 1 / s, applied in the kernel's
  prologue) and weights multiplied by it; the scales are computed on the smoothed statistics.

:class:`Calibration` saves to ``<path>.safetensors`` + ``<path>.json`` (model hash, plan
timesteps, the step -> group map, method, layers; written last, with the sha256 of the tensors
file and of the JSON document itself) and loads back, checking both checksums and every value
(scales finite and positive, one per group; a file without checksums loads with a warning);
any problem is a ValueError naming the file. ``check_model`` and ``check_plan`` refuse a model
(other weights, or layers whose shapes do not fit the scales) or a plan it was not made for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .artifacts import document_sha256, file_sha256, read_json
from .quant import QuantPolicy, is_candidate

log = logging.getLogger(__name__)

SAMPLES_PER_CALL = 2048  # (|x|, channel) pairs kept per layer per model call
METHODS = ("max", "percentile", "mse")
FORMAT = "diffrt-int8-calibration/1"


def model_hash(model: torch.nn.Module) -> str:
    """sha256 (hex, 16 chars) of the model's state dict: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class Calibration:
    """Activation scales per quantized layer and timestep group, and what they were made for."""

    model_hash: str
    timesteps: list[float]
    step_groups: list[int]  # group of each plan step
    scales: dict[str, torch.Tensor]  # layer -> fp32 [G]
    inv_smooth: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> fp32 [K] (SmoothQuant)
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False, repr=False)  # the JSON file it was loaded from

    @property
    def groups(self) -> int:
        return max(self.step_groups) + 1

    def layer_scales(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return {name: (scale, self.inv_smooth.get(name)) for name, scale in self.scales.items()}

    def group_lookup(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(plan timesteps fp32 [S], their groups int64 [S]) on ``device`` (for :meth:`groups_of`)."""
        cache = self.__dict__.setdefault("_lookup", {})
        key = str(device)
        if key not in cache:
            cache[key] = (torch.tensor(self.timesteps, dtype=torch.float32, device=device),
                          torch.tensor(self.step_groups, dtype=torch.int64, device=device))
        return cache[key]

    def groups_of(self, t: torch.Tensor) -> torch.Tensor:
        """Group ids int64 [B] of model timesteps t [B]: the group of the nearest plan timestep (on the device)."""
        timesteps, groups = self.group_lookup(t.device)
        nearest = (t.reshape(-1, 1).to(torch.float32) - timesteps[None, :]).abs().argmin(dim=1)
        return groups.index_select(0, nearest)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model with other weights than the calibrated one, or layers the scales do not fit."""
        found = model_hash(model)
        if found != self.model_hash:
            raise ValueError(f"{self._named()}was made for model {self.model_hash}, not {found} "
                             "(other weights): calibrate this model")
        modules = dict(model.named_modules())
        for name in self.scales:
            module = modules.get(name)
            if module is None or not is_candidate(module):
                raise ValueError(f"{self._named()}has scales for {name!r}, which is not a Linear / 1x1 conv layer "
                                 f"of {type(model).__name__}")
            inputs = module.weight.shape[1]
            if name in self.inv_smooth and self.inv_smooth[name].shape != (inputs,):
                raise ValueError(f"{self._named()}has {tuple(self.inv_smooth[name].shape)} smoothing factors for "
                                 f"{name!r}, which takes {inputs} input channels")

    def _named(self) -> str:
        return f"the calibration {self.source} " if self.source is not None else "this calibration "

    def check_plan(self, plan) -> None:
        """Refuse a solver plan whose timesteps are not the calibrated ones."""
        timesteps = [float(t) for t in plan.timesteps()]
        if len(timesteps) != len(self.timesteps) or any(abs(a - b) > 1e-3 for a, b in zip(timesteps, self.timesteps)):
            raise ValueError(f"this calibration was made for a {len(self.timesteps)}-step plan with timesteps "
                             f"{_short(self.timesteps)}; the sampler's plan has {len(timesteps)} steps "
                             f"{_short(timesteps)}: calibrate with the same solver and steps")

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors``, then ``path.json`` with both checksums; returns the JSON path."""
        from safetensors.torch import save_file  # noqa: PLC0415

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.scales": s.contiguous() for name, s in self.scales.items()}
        tensors.update({f"{name}.inv_smooth": s.contiguous() for name, s in self.inv_smooth.items()})
        weights_path = path.with_suffix(".safetensors")
        save_file(tensors, str(weights_path), metadata={"format": FORMAT})
        document = json.loads(json.dumps({  # as it will read back, so that its checksum does too
            "format": FORMAT, "model_hash": self.model_hash, "timesteps": self.timesteps,
            "step_groups": self.step_groups, "layers": sorted(self.scales), "smoothed": sorted(self.inv_smooth),
            **self.meta}))
        document["sha256"] = {"safetensors": file_sha256(weights_path), "json": document_sha256(document)}
        json_path = path.with_suffix(".json")
        json_path.write_text(json.dumps(document, indent=1) + "\n")
        return json_path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read what :meth:`save` wrote (``path`` with or without a suffix), checked (module docstring)."""
        path = Path(path)
        json_path, weights_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        for file in (json_path, weights_path):
            if not file.is_file():
                raise FileNotFoundError(f"calibration file {file} is missing")
        document = read_json(json_path)
        if document.get("format") != FORMAT:
            raise ValueError(f"{json_path} is not a diffrt INT8 calibration ({FORMAT})")
        _verify_checksums(json_path, weights_path, document)
        _check_document(json_path, document)
        groups = max(document["step_groups"]) + 1
        tensors = _read_tensors(weights_path)
        scales = {name: _tensor(weights_path, tensors, f"{name}.scales", (groups,)) for name in document["layers"]}
        inv_smooth = {name: _tensor(weights_path, tensors, f"{name}.inv_smooth", None) for name in document["smoothed"]}
        meta = {k: v for k, v in document.items() if k not in _DOCUMENT_KEYS}
        return cls(document["model_hash"], [float(t) for t in document["timesteps"]], document["step_groups"],
                   scales, inv_smooth, meta, source=json_path)


_DOCUMENT_KEYS = ("format", "model_hash", "timesteps", "step_groups", "layers", "smoothed", "sha256")


def _verify_checksums(json_path: Path, weights_path: Path, document: dict[str, Any]) -> None:
    """Check the JSON's own sha256 and the tensors file's; a file saved without them loads with a warning."""
    recorded = document.get("sha256")
    if recorded is None:
        log.warning("%s carries no checksum (saved by an older diffrt): loaded without verifying it", json_path)
        return
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(k), str) for k in ("json", "safetensors")):
        raise ValueError(f"{json_path}: 'sha256' must be {{'json': <hex>, 'safetensors': <hex>}}")
    if document_sha256(document) != recorded["json"]:
        raise ValueError(f"{json_path} does not match its sha256 (corrupt or edited)")
    if file_sha256(weights_path) != recorded["safetensors"]:
        raise ValueError(f"{weights_path} does not match the sha256 recorded in {json_path} (corrupt or replaced)")


def _check_document(json_path: Path, document: dict[str, Any]) -> None:
    """Raise ValueError naming ``json_path`` when a field has the wrong type or an impossible value."""
    def fail(message: str) -> None:
        raise ValueError(f"{json_path}: {message}")

    def numbers(values: Any) -> bool:
        return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in values)

    if not isinstance(document.get("model_hash"), str):
        fail("'model_hash' must be a string")
    timesteps, groups = document.get("timesteps"), document.get("step_groups")
    if not numbers(timesteps) or not timesteps or not all(math.isfinite(t) for t in timesteps):
        fail("'timesteps' must be a non-empty list of finite numbers")
    if not numbers(groups) or len(groups) != len(timesteps) or not all(isinstance(g, int) for g in groups):
        fail(f"'step_groups' must be a list of {len(timesteps)} ints (one group per step)")
    if sorted(set(groups)) != list(range(max(groups) + 1)):
        fail(f"'step_groups' must number the groups 0..G-1, got {sorted(set(groups))}")
    layers, smoothed = document.get("layers"), document.get("smoothed")
    for key, names in (("layers", layers), ("smoothed", smoothed)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail(f"'{key}' must be a list of layer names")
    if not layers:
        fail("'layers' names no layer")
    if not set(smoothed) <= set(layers):
        fail(f"'smoothed' names layers without scales: {sorted(set(smoothed) - set(layers))}")


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(weights_path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({type(error).__name__}: {error})") from error


def _tensor(weights_path: Path, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | None):
    """``tensors[key]`` as fp32, checked: present, 1-D of ``shape`` (any length if None), finite and positive."""
    value = tensors.get(key)
    if value is None:
        raise ValueError(f"{weights_path}: no tensor {key!r}")
    if (not value.is_floating_point() or value.ndim != 1 or value.numel() == 0
            or (shape is not None and tuple(value.shape) != shape)):
        expected = f"{shape[0]} (one per timestep group)" if shape is not None else "K (one per input channel)"
        raise ValueError(f"{weights_path}: {key!r} must be a 1-D float tensor of length {expected}, "
                         f"got {value.dtype} {tuple(value.shape)}")
    value = value.float()
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError(f"{weights_path}: {key!r} holds values that are not finite and positive "
                         f"(min {value.min().item():g}): a damaged calibration")
    return value


def _short(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"


class _Recorder:
    """Forward pre-hooks that collect per-step input statistics of the chosen layers."""

    def __init__(self, modules: dict[str, torch.nn.Module], steps: int, seed: int):
        self.step = 0
        self.channel_max: dict[str, list[torch.Tensor | None]] = {n: [None] * steps for n in modules}
        self.samples: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(steps)] for n in modules}
        self.generator = torch.Generator().manual_seed(seed)
        self.handles = [m.register_forward_pre_hook(self._hook(n, isinstance(m, torch.nn.Conv2d)))
                        for n, m in modules.items()]

    def _hook(self, name: str, conv: bool):
        def hook(module, inputs):
            x = inputs[0].detach()
            rows = (x.transpose(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1]).abs().float()
            channel_max = rows.amax(dim=0).cpu()
            previous = self.channel_max[name][self.step]
            self.channel_max[name][self.step] = channel_max if previous is None else torch.maximum(previous, channel_max)
            flat = rows.reshape(-1)
            pick = torch.randint(0, flat.numel(), (min(SAMPLES_PER_CALL, flat.numel()),), generator=self.generator)
            values = flat[pick.to(flat.device)].cpu()
            self.samples[name][self.step].append(torch.stack([values, (pick % rows.shape[1]).float()], dim=1))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _groups(channel_max: dict[str, list[torch.Tensor]], steps: int, groups: int | str, tolerance: float) -> list[int]:
    """The group of each step (module docstring)."""
    if groups == "steps":
        return list(range(steps))
    if groups == "auto":
        ranges = torch.stack([torch.stack([c.max() for c in per_step]) for per_step in channel_max.values()])  # [L, S]
        assignment, low, high, group = [0], ranges[:, 0].clone(), ranges[:, 0].clone(), 0
        for step in range(1, steps):
            new_low, new_high = torch.minimum(low, ranges[:, step]), torch.maximum(high, ranges[:, step])
            if bool((new_high <= new_low.clamp_min(1e-12) * (1 + tolerance)).all()):
                low, high = new_low, new_high
            else:
                group += 1
                low, high = ranges[:, step].clone(), ranges[:, step].clone()
            assignment.append(group)
        return assignment
    if isinstance(groups, int) and 1 <= groups <= steps:
        return [step * groups // steps for step in range(steps)]
    raise ValueError(f"groups must be an int in 1..{steps}, 'steps' or 'auto'; got {groups!r}")


def _clip(values: torch.Tensor, vmax: float, method: str, percentile: float) -> float:
    """The clipping value (scale * 127) of |x| samples ``values`` with maximum ``vmax``."""
    if method == "max" or values.numel() == 0 or vmax <= 0:
        return vmax
    if method == "percentile":
        return max(float(torch.quantile(values.double(), percentile / 100.0)), vmax * 1e-3)
    best, best_err = vmax, math.inf
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():
        clip = vmax * ratio
        scale = clip / 127.0
        err = ((torch.clamp(torch.round(values / scale), max=127) * scale - values) ** 2).mean().item()
        if err < best_err:
            best, best_err = clip, err
    return best


def calibrate(den, solver: str = "dpmpp-2m", steps: int = 20, cond: Sequence[Any] | torch.Tensor | None = None,
              uncond: Any = None, guidance_scale: float | None = 3.0, seeds: Sequence[int] = (0,),
              groups: int | str = "auto", method: str = "mse", percentile: float = 99.99, smoothquant: float | None = None,
              policy: QuantPolicy | None = None, tolerance: float = 0.25, batch_size: int = 64, seed: int = 0,
              progress: bool = True, **solver_options: Any) -> Calibration:
    """Calibrate ``den`` (a Denoiser) for INT8 on the plan ``Sampler(den, solver, steps, ...)`` (module docstring).

    ``cond``: the calibration conditions (a tensor [N, ...] or a list of per-sample conditions;
    class labels for the digits models); each is sampled once per seed in ``seeds``. ``uncond``:
    the unconditional conditioning for CFG ([N, ...] or one broadcast row).
    """
    from diffrt.runtime.sampler import Sampler  # noqa: PLC0415

    model = _check_denoiser(den)
    _check_numbers(guidance_scale, method, percentile, smoothquant, tolerance, batch_size, seed)
    seeds = _check_seeds(seeds)
    cond = _check_conditions(cond, uncond, guidance_scale)
    sampler = Sampler(den, solver, steps, guidance_scale=guidance_scale, **solver_options)  # solver, steps, options
    plan_steps = sampler.plan.steps
    _check_groups(groups, plan_steps)
    sampler._check_conditions(cond, uncond, len(cond))  # class labels in range: refused before any batch runs
    names = (policy or QuantPolicy()).select(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear / 1x1 conv layers the policy quantizes")
    modules = dict(model.named_modules())
    runs = [(s, start) for s in seeds for start in range(0, len(cond), batch_size)]
    recorder = _Recorder({n: modules[n] for n in names}, plan_steps, seed)
    device = den.device or torch.device("cpu")
    try:
        with torch.no_grad():
            for run_seed, start in tqdm(runs, desc="calibrate", unit="batch", disable=not progress):
                c = cond[start:start + batch_size].to(device)
                noise = torch.randn(len(c), *den.sample_shape, generator=torch.Generator().manual_seed(run_seed + start))
                u = uncond
                if torch.is_tensor(uncond):
                    u = (uncond if uncond.shape[0] == 1 else uncond[start:start + batch_size]).to(device)
                recorder.step = 0  # the sampler's callback moves it on after each step
                sampler.sample(noise.to(device), cond=c, uncond=u,
                               callback=lambda i, x: setattr(recorder, "step", i + 1))
    finally:
        recorder.remove()
    step_groups = _groups(recorder.channel_max, plan_steps, groups, tolerance)
    scales, inv_smooth = _choose_scales(recorder, modules, names, step_groups, method, percentile, smoothquant)
    meta = {"solver": solver, "steps": steps, "solver_options": solver_options, "guidance_scale": guidance_scale,
            "seeds": list(seeds), "conditions": len(cond), "groups_requested": groups, "method": method,
            "percentile": percentile, "smoothquant": smoothquant, "tolerance": tolerance, "seed": seed}
    log.info("calibrate: %d layers, %d steps in %d groups (%s), method %s%s", len(names), plan_steps,
             max(step_groups) + 1, groups, method, f", SmoothQuant alpha {smoothquant}" if smoothquant else "")
    return Calibration(model_hash(model), [float(t) for t in sampler.plan.timesteps()], step_groups, scales,
                       inv_smooth, meta)


def _option_error(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"calibrate: {name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_denoiser(den: Any) -> torch.nn.Module:
    """The model of ``den``, which must be a Denoiser around an nn.Module (its layers get the hooks)."""
    from diffrt.runtime.denoiser import Denoiser  # noqa: PLC0415

    if not isinstance(den, Denoiser):
        raise TypeError(f"calibrate: den must be a diffrt Denoiser, got {type(den).__name__}")
    if not isinstance(den.model, torch.nn.Module):
        raise TypeError(f"calibrate: den.model must be a torch.nn.Module (its layers are calibrated), "
                        f"got {type(den.model).__name__}")
    if den.sample_shape is None:
        raise ValueError("calibrate: den.sample_shape is unknown; give the Denoiser a sample_shape")
    return den.model


def _check_numbers(guidance_scale: Any, method: Any, percentile: Any, smoothquant: Any, tolerance: Any,
                   batch_size: Any, seed: Any) -> None:
    """Raise ValueError naming the first scalar option of :func:`calibrate` out of its range."""
    if guidance_scale is not None and not _is_real(guidance_scale):
        raise _option_error("guidance_scale", "None or a finite number", guidance_scale)
    if not isinstance(method, str) or method not in METHODS:
        raise _option_error("method", f"one of {', '.join(METHODS)}", method)
    if not _is_real(percentile) or not 0 < percentile <= 100:
        raise _option_error("percentile", "a number in (0, 100]", percentile)
    if smoothquant is not None and (not _is_real(smoothquant) or not 0 < smoothquant < 1):
        raise _option_error("smoothquant", "None or the migration strength alpha in (0, 1)", smoothquant)
    if not _is_real(tolerance) or tolerance <= 0:
        raise _option_error("tolerance", "a finite positive number", tolerance)
    if not _is_int(batch_size) or batch_size < 1:
        raise _option_error("batch_size", "a positive int", batch_size)
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:
        raise _option_error("seed", "a non-negative int", seed)


def _check_seeds(seeds: Any) -> list[int]:
    """``seeds`` as a list: a non-empty sequence of non-negative ints."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
        raise _option_error("seeds", "a non-empty sequence of ints", seeds)
    if not all(_is_int(s) and 0 <= s < 2 ** 62 for s in seeds):
        raise _option_error("seeds", "a non-empty sequence of non-negative ints", seeds)
    return list(seeds)


def _check_conditions(cond: Any, uncond: Any, guidance_scale: Any) -> torch.Tensor:
    """``cond`` as a tensor [N, ...] (N >= 1); ``uncond`` (a tensor) with 1 or N rows; uncond given for CFG."""
    if cond is None:
        raise ValueError("calibrate needs cond: the calibration conditions (class labels, prompt embeddings)")
    if not torch.is_tensor(cond):
        try:
            cond = torch.as_tensor(cond)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"calibrate: cond must be a tensor [N, ...] or a list of conditions, "
                            f"got {type(cond).__name__} ({error})") from error
    if cond.ndim == 0 or len(cond) == 0:
        raise _option_error("cond", "a non-empty batch of conditions [N, ...]", tuple(cond.shape))
    if guidance_scale is not None and uncond is None:
        raise ValueError("calibrate: guidance_scale is set, so uncond (the unconditional conditioning) is needed")
    if torch.is_tensor(uncond) and (uncond.ndim == 0 or uncond.shape[0] not in (1, len(cond))):
        raise ValueError(f"calibrate: uncond has shape {tuple(uncond.shape)}; cond has {len(cond)} rows: "
                         f"give uncond 1 row or {len(cond)}")
    return cond


def _check_groups(groups: Any, plan_steps: int) -> None:
    """``groups``: "steps", "auto", or an int in 1..plan_steps (module docstring)."""
    if isinstance(groups, str) and groups in ("steps", "auto"):
        return
    if not _is_int(groups) or not 1 <= groups <= plan_steps:
        raise _option_error("groups", f"an int in 1..{plan_steps} (the plan's steps), 'steps' or 'auto'", groups)


def _choose_scales(recorder: _Recorder, modules, names, step_groups, method, percentile, smoothquant):
    scales, inv_smooth = {}, {}
    n_groups = max(step_groups) + 1
    for name in names:
        inv = None
        if smoothquant is not None:
            act_max = torch.stack(recorder.channel_max[name]).amax(dim=0).clamp_min(1e-5)
            weight = modules[name].weight.detach().float().reshape(modules[name].weight.shape[0], -1)
            w_max = weight.abs().amax(dim=0).clamp_min(1e-5)
            smooth = (act_max ** smoothquant / w_max ** (1 - smoothquant)).clamp_min(1e-5)
            inv = 1.0 / smooth
            inv_smooth[name] = inv
        per_group = []
        for group in range(n_groups):
            members = [s for s, g in enumerate(step_groups) if g == group]
            pairs = torch.cat([p for s in members for p in recorder.samples[name][s]])
            values = pairs[:, 0] if inv is None else pairs[:, 0] * inv[pairs[:, 1].long()]
            channel_max = torch.stack([recorder.channel_max[name][s] for s in members]).amax(dim=0)
            vmax = float((channel_max if inv is None else channel_max * inv).max())
            per_group.append(max(_clip(values, vmax, method, percentile), 1e-8) / 127.0)
        scales[name] = torch.tensor(per_group, dtype=torch.float32)
    return scales, inv_smooth
