"""LinearAG: estimate early unconditional passes of classifier-free guidance from past predictions.

Adaptive guidance (``Sampler(adaptive_guidance=...)``) saves the late steps, once the conditional
and unconditional predictions agree. LinearAG (the same paper's second method) saves early ones:
at chosen steps ``i`` the unconditional prediction is not evaluated but estimated as a per-step
linear combination

    u_i ~= a_i c_i + b_i c_{i-1} + d_i u_{i-1} + e_i x_i

of the conditional prediction now, both predictions of the previous step and the model input
``x_i`` (which makes the combination exact for a change of parametrisation such as v <-> eps).
The four coefficients of every step are fitted once by least squares on full-CFG trajectories of
the same sampler (:func:`fit_linear_ag`), so they belong to one model, solver and step count.

    lag = fit_linear_ag(Sampler(den, "dpmpp-2m", 20, guidance_scale=3.0), cond, uncond, samples=256)
    x = Sampler(den, "dpmpp-2m", 20, guidance_scale=3.0, linear_ag=lag).sample(noise, cond, uncond)

The estimated steps are by default every other step of the first half (``every=2, until=0.5``):
each estimate leans on a real pass one step back. ``sampler.stats`` counts the evaluations saved.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

N_TERMS = 4  # c_i, c_{i-1}, u_{i-1}, x_i


@dataclass
class LinearAG:
    """Per-step coefficients [steps, 4] (for c_i, c_{i-1}, u_{i-1}, x_i), the steps whose unconditional
    pass is estimated, and the plan they were fitted for (:func:`plan_id`: solver, options, timesteps)."""

    coefficients: torch.Tensor
    estimated_steps: tuple[int, ...]
    plan: str
    steps: int
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_plan(cls, coefficients, estimated_steps, plan, record: dict[str, Any] | None = None) -> "LinearAG":
        """Coefficients for a given :class:`~diffrt.runtime.solvers.plan.SolverPlan`."""
        return cls(coefficients, tuple(estimated_steps), plan_id(plan), plan.steps, dict(record or {}))

    def __post_init__(self) -> None:
        self.coefficients = torch.as_tensor(self.coefficients, dtype=torch.float64)
        if self.coefficients.shape != (self.steps, N_TERMS):
            raise ValueError(f"LinearAG coefficients must be [steps={self.steps}, {N_TERMS}], "
                             f"got {tuple(self.coefficients.shape)}")
        if not torch.isfinite(self.coefficients).all():
            raise ValueError("LinearAG coefficients contain NaN or Inf")
        self.estimated_steps = tuple(sorted({int(i) for i in self.estimated_steps}))
        bad = [i for i in self.estimated_steps if not 1 <= i < self.steps]
        if bad:
            raise ValueError(f"estimated steps must lie in [1, {self.steps}) (step 0 has no past), got {bad}")
        self._estimated = frozenset(self.estimated_steps)
        self._device_coefficients: dict[tuple, torch.Tensor] = {}

    def estimates(self, step: int) -> bool:
        """Whether the unconditional pass of ``step`` is estimated rather than evaluated."""
        return step in self._estimated

    def check_plan(self, plan) -> None:
        """Refuse a plan other than the one the coefficients were fitted on."""
        if plan.steps != self.steps or plan_id(plan) != self.plan:
            raise ValueError(f"these LinearAG coefficients were fitted for another plan ({self.steps} steps, plan "
                             f"{self.plan}); the sampler runs {plan.solver} with {plan.steps} steps (plan "
                             f"{plan_id(plan)}): fit them again (fit_linear_ag)")

    def estimate(self, step: int, cond: torch.Tensor, prev_cond: torch.Tensor, prev_uncond: torch.Tensor,
                 x_in: torch.Tensor) -> torch.Tensor:
        """The unconditional prediction of ``step`` from the four terms (same shape as ``cond``)."""
        key = (cond.device, cond.dtype)
        if key not in self._device_coefficients:
            self._device_coefficients[key] = self.coefficients.to(device=cond.device, dtype=torch.float32)
        a, b, d, e = self._device_coefficients[key][step]
        out = a * cond.float() + b * prev_cond.float() + d * prev_uncond.float() + e * x_in.float()
        return out.to(cond.dtype)

    def save(self, path: str | Path) -> None:
        """Coefficients and their record as JSON (a few hundred bytes)."""
        Path(path).write_text(json.dumps({"plan": self.plan, "steps": self.steps,
                                          "estimated_steps": list(self.estimated_steps),
                                          "coefficients": self.coefficients.tolist(), "record": self.record},
                                         indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LinearAG":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no LinearAG coefficients at {path}")
        data = json.loads(path.read_text())
        return cls(torch.tensor(data["coefficients"]), tuple(data["estimated_steps"]), data["plan"],
                   int(data["steps"]), data.get("record", {}))


def plan_id(plan) -> str:
    """A short hash naming a solver plan: its solver, options and timesteps."""
    text = json.dumps({"solver": plan.solver, "options": plan.options, "timesteps": plan.timesteps().tolist()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_estimated_steps(steps: int, every: int = 2, until: float = 0.5) -> tuple[int, ...]:
    """Every ``every``-th step from step 1 up to ``until`` of the trajectory (step 0 has no past)."""
    if every < 1 or not 0 <= until <= 1:
        raise ValueError(f"every must be >= 1 and until in [0, 1], got every={every}, until={until}")
    return tuple(range(1, round(until * steps), every))


def fit_linear_ag(sampler, cond: torch.Tensor, uncond: torch.Tensor, samples: int = 256, seed: int = 1234,
                  batch_size: int = 64, every: int = 2, until: float = 0.5,
                  estimated_steps: tuple[int, ...] | None = None, progress: bool = True) -> LinearAG:
    """Fit LinearAG's per-step coefficients on ``samples`` full-CFG trajectories of ``sampler``.

    ``cond`` gives the conditions the trajectories cycle through ([n, ...], e.g. class labels) and
    ``uncond`` the unconditional one ([1, ...] or [n, ...]); the noise is drawn from ``seed`` (keep it
    apart from the noise you evaluate on). The normal equations are accumulated in float64 over all
    elements of all samples, so memory stays one batch. The record keeps each step's relative residual.
    """
    if sampler.guidance_scale is None:
        raise ValueError("LinearAG estimates the unconditional pass of CFG: the sampler needs a guidance_scale")
    if not (torch.is_tensor(cond) and torch.is_tensor(uncond)):
        raise TypeError("fit_linear_ag needs cond and uncond as tensors")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    steps = sampler.plan.steps
    chosen = default_estimated_steps(steps, every, until) if estimated_steps is None else tuple(estimated_steps)
    if any(not 1 <= int(i) < steps for i in chosen):
        raise ValueError(f"estimated steps must lie in [1, {steps}) (step 0 has no past), got {chosen}")
    den = sampler.denoiser
    shape = tuple(den.sample_shape)
    gram = torch.zeros(steps, N_TERMS, N_TERMS, dtype=torch.float64)
    rhs = torch.zeros(steps, N_TERMS, dtype=torch.float64)
    target = torch.zeros(steps, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    device = getattr(den, "device", None) or torch.device("cpu")
    bar = tqdm(total=samples * steps, desc="LinearAG fit", unit="eval", disable=not progress)
    done = 0
    with torch.no_grad():
        while done < samples:
            n = min(batch_size, samples - done)
            noise = torch.randn((n, *shape), generator=generator).to(device)
            index = torch.arange(done, done + n) % cond.shape[0]
            c_batch = cond[index.to(cond.device)]
            u_batch = uncond.expand(n, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond[index.to(uncond.device)]
            state = sampler.start(noise)
            prev = None
            for i in range(steps):
                x_in, t = sampler.model_inputs(state)
                out_uncond, out_cond = den(torch.cat([x_in, x_in]), t.repeat(2), torch.cat([u_batch, c_batch])).chunk(2)
                if prev is not None:
                    terms = torch.stack([out_cond, prev[0], prev[1], x_in]).flatten(1).double()  # [4, elements]
                    y = out_uncond.flatten().double()
                    gram[i] += (terms @ terms.T).cpu()
                    rhs[i] += (terms @ y).cpu()
                    target[i] += float(y @ y)
                prev = (out_cond, out_uncond)
                sampler.step(state, out_cond, out_uncond)
                bar.update(n)
            done += n
    bar.close()
    coefficients = torch.zeros(steps, N_TERMS, dtype=torch.float64)
    residual = [None] * steps
    for i in range(1, steps):
        ridge = 1e-9 * torch.diagonal(gram[i]).mean() * torch.eye(N_TERMS, dtype=torch.float64)
        w = torch.linalg.solve(gram[i] + ridge, rhs[i])
        coefficients[i] = w
        # ||y - A w||^2 = y.y - 2 w.A^T y + w.A^T A w
        error = target[i] - 2 * w @ rhs[i] + w @ gram[i] @ w
        residual[i] = float(error.clamp_min(0).sqrt() / target[i].sqrt())
    record = {"samples": samples, "seed": seed, "guidance_scale": sampler.guidance_scale,
              "relative_residual_per_step": residual}
    fitted = LinearAG.for_plan(coefficients, chosen, sampler.plan, record)
    log.info("LinearAG fitted on %d trajectories; relative residual at the estimated steps: %s", samples,
             ", ".join(f"{i}: {residual[i]:.3f}" for i in fitted.estimated_steps))
    return fitted
