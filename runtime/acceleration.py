"""Acceleration: one combination of diffrt's speed-ups, as a value that is saved, loaded and applied.

``diffrt tune`` writes one (JSON); ``optimize(den, config=...)`` applies its model-side part,
:meth:`Acceleration.sampler` builds the Sampler with its solver-side part, and ``diffrt bench
--config FILE`` benchmarks it. Fields (every one optional; ``None`` = off / the caller's default):

* ``solver``, ``steps``: the solver plan (None: the caller's).
* ``dtype``: "float16", "bfloat16", "float32" or "auto" (float16 on CUDA, float32 elsewhere).
* ``attention``: diffrt's attention backend ("auto", "triton", "reference") or None (leave it).
* ``todo``: ToDo keyword arguments ({"factor": 2, "min_tokens": 4096, "mode": "nearest"}).
* ``sparse``: :class:`~diffrt.runtime.attention.Sparse` keyword arguments.
* ``int8``: None, "dynamic", or a calibration: {"path": saved calibration (relative to the
  config file in the file; :meth:`Acceleration.load` makes it absolute), "groups": ...}. A
  calibration is bound to its model's weights (hash checked).
* ``adaptive_guidance``, ``early_exit``, ``step_cache``: thresholds (Sampler / optimize options).
* ``cuda_graphs``: capture the model call per shape bucket (power-of-two batch buckets); with early
  exit the segments between exits are captured instead (not with a calibration: their graphs
  would keep one call's timestep groups).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT = "diffrt-acceleration/1"


@dataclass(frozen=True)
class Acceleration:
    """A combination of accelerations (module docstring)."""

    solver: str | None = None
    steps: int | None = None
    dtype: str = "auto"
    attention: str | None = "auto"
    todo: dict[str, Any] | None = None
    sparse: dict[str, Any] | None = None
    int8: str | dict[str, Any] | None = None
    adaptive_guidance: float | None = None
    early_exit: float | None = None
    step_cache: float | None = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"Acceleration.dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"Acceleration.steps must be a positive int, got {self.steps!r}")
        if self.int8 is not None and self.int8 != "dynamic" and not (isinstance(self.int8, dict) and "path" in self.int8):
            raise ValueError("Acceleration.int8 must be None, 'dynamic' or {'path': <saved calibration>, ...}, "
                             f"got {self.int8!r}")

    def replace(self, **changes: Any) -> "Acceleration":
        return dataclasses.replace(self, **changes)

    def torch_dtype(self, device: torch.device | str) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if torch.device(device).type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def exact(self) -> bool:
        """True when nothing here changes the maths beyond the dtype (no approximation)."""
        return not (self.todo or self.sparse or self.int8 or self.adaptive_guidance is not None
                    or self.early_exit is not None or self.step_cache is not None)

    def describe(self) -> str:
        """A short human-readable summary: 'fp16 dpmpp-2m/12 int8 ag=0.95 graphs'."""
        parts = [self.dtype if self.dtype != "auto" else "auto-dtype"]
        if self.solver or self.steps:
            parts.append(f"{self.solver or 'solver'}/{self.steps or '-'}")
        if self.attention is None:
            parts.append("model-attention")
        if self.todo:
            factor = self.todo.get("factor", 2)
            levels = ",".join(f"{k}:{v}" for k, v in factor.items()) if isinstance(factor, dict) else factor
            parts.append(f"todo={levels}")
        if self.sparse:
            kind = self.sparse.get("kind", "window")
            detail = f"r{self.sparse.get('radius', 8)}" if kind == "window" else f"tau{self.sparse.get('tau')}"
            parts.append(f"sparse={kind}:{detail}")
        if self.int8:
            parts.append("int8" if self.int8 == "dynamic" else f"int8[{self.int8.get('groups', 'cal')}]")
        for name, value in (("ag", self.adaptive_guidance), ("exit", self.early_exit), ("cache", self.step_cache)):
            if value is not None:
                parts.append(f"{name}={value:g}")
        if self.cuda_graphs:
            parts.append("graphs")
        return " ".join(parts)

    # ------------------------------------------------------------------ applying it

    def optimize_kwargs(self, device: torch.device | str, base_dir: str | Path | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`~diffrt.runtime.optimize` (a saved calibration is loaded here)."""
        from .attention import Sparse, ToDo  # noqa: PLC0415

        todo = dict(self.todo or {})
        if isinstance(todo.get("factor"), dict):  # JSON keys are strings: {"0": 2} -> {0: 2}
            todo["factor"] = {int(level): int(f) for level, f in todo["factor"].items()}
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype(device), "attention": self.attention,
                                  "todo": ToDo(**todo) if todo else None,
                                  "sparse": Sparse(**self.sparse) if self.sparse else None,
                                  "step_cache": self.step_cache}
        if self.int8 == "dynamic":
            kwargs["int8"] = "dynamic"
        elif self.int8:
            from diffrt.export import Calibration  # noqa: PLC0415

            path = Path(self.int8["path"])
            kwargs["int8"] = Calibration.load(path if path.is_absolute() or base_dir is None else Path(base_dir) / path)
        return kwargs

    def sampler(self, den: Any, solver: str = "dpmpp-2m", steps: int = 20, guidance_scale: float | None = None,
                **options: Any):
        """``Sampler(den, ...)`` with this config's solver, steps, adaptive guidance and early exit
        (``solver`` / ``steps`` are the fallbacks when the config leaves them open)."""
        from .sampler import Sampler  # noqa: PLC0415

        guided = guidance_scale is not None
        return Sampler(den, self.solver or solver, self.steps or steps, guidance_scale=guidance_scale,
                       adaptive_guidance=self.adaptive_guidance if guided else None, early_exit=self.early_exit,
                       early_exit_graphs=self.cuda_graphs and self.early_exit is not None and not isinstance(self.int8, dict),
                       **options)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Acceleration":
        data = dict(data)
        found = data.pop("format", FORMAT)
        if found != FORMAT:
            raise ValueError(f"not a {FORMAT} configuration (format {found!r})")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown acceleration option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the config as JSON (``extra``: what produced it, kept under "tuning")."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = self.to_dict() if extra is None else {**self.to_dict(), "tuning": extra}
        path.write_text(json.dumps(document, indent=1, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Acceleration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no acceleration config at {path} (diffrt tune writes one)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from error
        data.pop("tuning", None)
        acc = cls.from_dict(data)
        if isinstance(acc.int8, dict) and not Path(acc.int8["path"]).is_absolute():  # saved relative to the file
            acc = acc.replace(int8={**acc.int8, "path": str((path.parent / acc.int8["path"]).resolve())})
        return acc


def resolve(config: Acceleration | str | Path | dict | None) -> tuple[Acceleration | None, Path | None]:
    """(Acceleration, the folder relative paths in it refer to) for a config, a dict or a JSON path."""
    if config is None or isinstance(config, Acceleration):
        return config, None
    if isinstance(config, dict):
        return Acceleration.from_dict(config), None
    path = Path(config)
    return Acceleration.load(path), path.parent
