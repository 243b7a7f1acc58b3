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

Every value is checked on construction (a JSON ``"cuda_graphs": "no"`` is refused, not taken as
true; thresholds must be finite numbers in range). :meth:`Acceleration.save` writes the document's
sha256 last (``"sha256"``) and :meth:`Acceleration.load` checks it: a damaged or malformed file, a
wrong type or an unknown key is a ValueError naming the file. A file without a checksum (hand
written, or saved by an older diffrt) loads with a warning; after editing a saved file by hand,
delete its ``"sha256"`` entry.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT = "diffrt-acceleration/1"
INT8_KEYS = ("path", "groups")
# threshold field -> (lowest, highest, whether the lowest is allowed), as the Sampler / optimize accept them
THRESHOLDS = {"adaptive_guidance": (-1.0, math.inf, False), "early_exit": (0.0, 1.0, True),
              "step_cache": (0.0, math.inf, True)}


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
        """Refuse values of the wrong type or out of range (module docstring)."""
        for check in (_check_plan, _check_dtype_and_attention, _check_attention_options, _check_int8,
                      _check_thresholds):
            check(self)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"Acceleration.cuda_graphs must be true or false, got {self.cuda_graphs!r}")

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

        todo = _todo_kwargs(self.todo)
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
        """Write the config as JSON (``extra``: what produced it, kept under "tuning"), its sha256 last."""
        from diffrt.export.artifacts import document_sha256  # noqa: PLC0415

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = self.to_dict() if extra is None else {**self.to_dict(), "tuning": extra}
        document = json.loads(json.dumps(document, default=str))  # as it will read back
        document["sha256"] = document_sha256(document)
        path.write_text(json.dumps(document, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Acceleration":
        """Read a saved config, checked (module docstring); a problem is a ValueError naming ``path``."""
        from diffrt.export.artifacts import read_json  # noqa: PLC0415

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no acceleration config at {path} (diffrt tune writes one)")
        data = read_json(path)
        _verify_checksum(path, data)
        data.pop("sha256", None)
        data.pop("tuning", None)
        try:
            acc = cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error
        if isinstance(acc.int8, dict) and not Path(acc.int8["path"]).is_absolute():  # saved relative to the file
            acc = acc.replace(int8={**acc.int8, "path": str((path.parent / acc.int8["path"]).resolve())})
        return acc


def _verify_checksum(path: Path, document: dict[str, Any]) -> None:
    """Check the document's sha256; one without (hand written, or an older diffrt's) loads with a warning."""
    from diffrt.export.artifacts import document_sha256  # noqa: PLC0415

    recorded = document.get("sha256")
    if recorded is None:
        log.warning("%s carries no checksum (written by hand or by an older diffrt): loaded without verifying it",
                    path)
    elif recorded != document_sha256(document):
        raise ValueError(f"{path} does not match its sha256 (corrupt, or edited by hand: after editing a saved "
                         "config, delete its \"sha256\" entry)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_plan(acc: Acceleration) -> None:
    from .solvers import PRESETS  # noqa: PLC0415

    if acc.solver is not None and (not isinstance(acc.solver, str) or acc.solver not in PRESETS):
        raise ValueError(f"Acceleration.solver must be None or a solver name ({', '.join(sorted(PRESETS))}), got "
                         f"{acc.solver!r}")
    if acc.steps is not None and (not isinstance(acc.steps, int) or isinstance(acc.steps, bool) or acc.steps < 1):
        raise ValueError(f"Acceleration.steps must be a positive int, got {acc.steps!r}")


def _check_dtype_and_attention(acc: Acceleration) -> None:
    """dtype by name; attention a backend name (optimize() checks which; importing its list would be a circle)."""
    if not isinstance(acc.dtype, str) or (acc.dtype != "auto" and acc.dtype not in DTYPES):
        raise ValueError(f"Acceleration.dtype must be 'auto' or one of {', '.join(DTYPES)}, got {acc.dtype!r}")
    if acc.attention is not None and (not isinstance(acc.attention, str) or not acc.attention):
        raise ValueError(f"Acceleration.attention must be None or a backend name, got {acc.attention!r}")


def _todo_kwargs(todo: dict[str, Any] | None) -> dict[str, Any]:
    """ToDo keyword arguments of a config's ``todo`` (JSON keys are strings: {"0": 2} -> {0: 2})."""
    todo = dict(todo or {})
    if isinstance(todo.get("factor"), dict):
        try:
            todo["factor"] = {int(level): f for level, f in todo["factor"].items()}
        except (TypeError, ValueError) as error:
            raise ValueError(f"Acceleration.todo: factor levels must be ints, got {todo['factor']!r}") from error
    return todo


def _check_attention_options(acc: Acceleration) -> None:
    """``todo`` / ``sparse``: dicts of ToDo / Sparse keyword arguments that those classes accept."""
    from .attention import Sparse, ToDo  # noqa: PLC0415

    for name, kind, value in (("todo", ToDo, acc.todo), ("sparse", Sparse, acc.sparse)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"Acceleration.{name} must be a dict of {kind.__name__} options or None, got {value!r}")
        unknown = set(value) - {f.name for f in dataclasses.fields(kind)}
        if unknown:
            raise ValueError(f"Acceleration.{name}: unknown {kind.__name__} option(s) {', '.join(sorted(unknown))}")
        kind(**(_todo_kwargs(value) if name == "todo" else value))  # its own checks (ValueError)


def _check_int8(acc: Acceleration) -> None:
    int8 = acc.int8
    if int8 is None or int8 == "dynamic":
        return
    if not (isinstance(int8, dict) and isinstance(int8.get("path"), str)):
        raise ValueError("Acceleration.int8 must be None, 'dynamic' or {'path': <saved calibration>, ...}, "
                         f"got {int8!r}")
    unknown = set(int8) - set(INT8_KEYS)
    if unknown:
        raise ValueError(f"Acceleration.int8: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(INT8_KEYS)})")
    groups = int8.get("groups", "auto")
    if not (groups in ("auto", "steps") or (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1)):
        raise ValueError(f"Acceleration.int8.groups must be 'auto', 'steps' or an int >= 1, got {groups!r}")


def _check_thresholds(acc: Acceleration) -> None:
    for name, (low, high, low_allowed) in THRESHOLDS.items():
        value = getattr(acc, name)
        if value is None:
            continue
        above = _is_number(value) and (value >= low if low_allowed else value > low)
        if not (above and value <= high and math.isfinite(value)):
            bounds = f"{'[' if low_allowed else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
            raise ValueError(f"Acceleration.{name} must be None or a finite number in {bounds}, got {value!r}")


def resolve(config: Acceleration | str | Path | dict | None) -> tuple[Acceleration | None, Path | None]:
    """(Acceleration, the folder relative paths in it refer to) for a config, a dict or a JSON path."""
    if config is None or isinstance(config, Acceleration):
        return config, None
    if isinstance(config, dict):
        return Acceleration.from_dict(config), None
    if not isinstance(config, (str, Path)):
        raise TypeError(f"config must be an Acceleration, a dict or the path of a diffrt tune file, got "
                        f"{type(config).__name__}")
    path = Path(config)
    return Acceleration.load(path), path.parent
