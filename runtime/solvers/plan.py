"""Solver plans: a whole sampling trajectory as a table of coefficients, computed once.

A solver builder (ddim.py, euler.py, dpm.py, ...) turns a schedule and its options into a
list of :class:`StepRow`, one per model evaluation. Each row says what the model is fed
(timestep, input scale) and how the fused step (``diffrt.kernels.solver_step``) combines the
sample ``x``, the data prediction ``x0``, the (guided) model output ``m``, a noise draw and
the history slots into the next sample and new history entries. Builders never see
classifier-free guidance: :meth:`SolverPlan.tables` folds the guidance scale in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffrt.kernels.solver_step import X0_COLS, out_cols, table_width


@dataclass
class Combo:
    """x_coef*x + x0_coef*x0 + model_coef*m + noise_coef*noise + sum(hist[j] * H[j])."""

    x: float = 0.0
    x0: float = 0.0
    model: float = 0.0
    noise: float = 0.0
    hist: dict[int, float] = field(default_factory=dict)

    def plus(self, other: "Combo", scale: float = 1.0) -> "Combo":
        """self + scale * other (a new Combo)."""
        hist = dict(self.hist)
        for j, w in other.hist.items():
            hist[j] = hist.get(j, 0.0) + scale * w
        return Combo(self.x + scale * other.x, self.x0 + scale * other.x0, self.model + scale * other.model,
                     self.noise + scale * other.noise, hist)

    def scaled(self, scale: float) -> "Combo":
        return Combo().plus(self, scale)


@dataclass
class StepRow:
    """One model evaluation and the fused update that follows it.

    The model is called on ``c_in * x`` at ``timestep``; x0 = clamp(x0_x*x + x0_model*m, -clip, clip)
    (no clamp when ``clip`` is None); the next sample is ``out``; each (slot, combo) in ``writes``
    stores a new history entry. ``noise`` marks a row that consumes one fresh Gaussian draw.
    ``denoised`` (optional, not part of the fused step): what the scheduler's ``step()`` returns beside
    the next sample when that is not x0 (LCM's ``denoised``), as a combo of x, x0 and m.
    """

    timestep: float
    c_in: float
    x0_x: float
    x0_model: float
    out: Combo
    writes: list[tuple[int, Combo]] = field(default_factory=list)
    noise: bool = False
    clip: float | None = None
    denoised: Combo | None = None


@dataclass
class SolverPlan:
    """A solver's whole trajectory: rows, history size, initial noise scale.

    ``noise_dtype`` is the dtype the reference scheduler draws its step noise in (None: the
    sample's dtype), so that a seeded generator gives the same draws.
    """

    solver: str
    rows: list[StepRow]
    n_slots: int
    init_noise_sigma: float = 1.0
    noise_dtype: torch.dtype | None = None
    options: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of model evaluations (rows)."""
        return len(self.rows)

    @property
    def n_noise(self) -> int:
        """Number of Gaussian draws the trajectory consumes."""
        return sum(1 for r in self.rows if r.noise)

    @property
    def n_out(self) -> int:
        return 1 + max((len(r.writes) for r in self.rows), default=0)

    def timesteps(self) -> torch.Tensor:
        """Model timesteps, float64 [steps]."""
        return torch.tensor([r.timestep for r in self.rows], dtype=torch.float64)

    def input_scales(self) -> torch.Tensor:
        """Model input scales c_in, float64 [steps]."""
        return torch.tensor([r.c_in for r in self.rows], dtype=torch.float64)

    def tables(self, guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(float table fp32 [steps, W], int table int32 [steps, 1 + n_out]) with guidance folded in.

        ``guidance_scale`` None means a single model output (no unconditional branch).
        """
        g = 1.0 if guidance_scale is None else float(guidance_scale)
        n_out, n_slots = self.n_out, self.n_slots
        table = torch.zeros(self.steps, table_width(n_out, n_slots), dtype=torch.float64)
        itable = torch.full((self.steps, 1 + n_out), -1, dtype=torch.int32)
        noise_index = 0
        for i, row in enumerate(self.rows):
            clip = math.inf if row.clip is None else float(row.clip)
            table[i, :X0_COLS] = torch.tensor([g * row.x0_model, (1 - g) * row.x0_model, row.x0_x, -clip, clip],
                                              dtype=torch.float64)
            for k, combo in enumerate([row.out] + [c for _, c in row.writes]):
                table[i, X0_COLS + k * out_cols(n_slots):X0_COLS + (k + 1) * out_cols(n_slots)] = \
                    self._combo_columns(combo, g)
            for k, (slot, _) in enumerate(row.writes, start=1):
                if not 0 <= slot < n_slots:
                    raise ValueError(f"{self.solver} row {i} writes slot {slot}; the plan has {n_slots} slots")
                itable[i, 1 + k] = slot
            if row.noise:
                itable[i, 0] = noise_index
                noise_index += 1
            elif row.out.noise != 0:
                raise ValueError(f"{self.solver} row {i} has a noise coefficient but draws no noise")
        return table.to(torch.float32), itable

    def _combo_columns(self, combo: Combo, g: float) -> torch.Tensor:
        cols = torch.zeros(out_cols(self.n_slots), dtype=torch.float64)
        cols[:5] = torch.tensor([combo.x, combo.x0, g * combo.model, (1 - g) * combo.model, combo.noise],
                                dtype=torch.float64)
        for j, w in combo.hist.items():
            if not 0 <= j < self.n_slots:
                raise ValueError(f"{self.solver}: combo reads slot {j}; the plan has {self.n_slots} slots")
            cols[5 + j] = w
        return cols
