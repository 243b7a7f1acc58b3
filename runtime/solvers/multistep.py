"""Machinery shared by diffusers' multistep solvers (DPM-Solver, DEIS, UniPC): noise levels,
the per-step order rule, the expansion of divided differences into weights of stored model
outputs, and the ring of history slots."""
from __future__ import annotations

import numpy as np
import torch

from .plan import Combo, StepRow

Coefficients = tuple[float, list[float], float]  # (x weight, weight of M_0, M_1, ..., noise weight)


def alpha_sigma_lambda(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, lambda) of VE level ``s`` (0-dim float32), in diffusers' float order."""
    alpha = 1 / ((s**2 + 1) ** 0.5)
    sigma = s * alpha
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def multistep_orders(n: int, solver_order: int, last_first_order: bool, second_last_low: bool,
                     begin: int = 0) -> list[int]:
    """Order used at each of steps ``begin``..``n - 1`` of ``n`` by diffusers' multistep schedulers.

    ``last_first_order``: the last step is first order; ``second_last_low``: the second-to-last
    step is at most second order. Warm-up: step i uses at most order i - begin + 1 (a loop started at
    ``begin``, img2img's, starts the warm-up there: diffusers' ``lower_order_nums`` starts at 0).
    """
    if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
        raise ValueError(f"solver_order must be a positive int, got {solver_order!r}")
    if not 0 <= begin < n:
        raise ValueError(f"begin must index one of the {n} steps, got {begin}")
    orders = []
    for i in range(begin, n):
        done = min(i - begin, solver_order)  # diffusers' lower_order_nums before step i
        if solver_order == 1 or done < 1 or (i == n - 1 and last_first_order):
            orders.append(1)
        elif solver_order == 2 or done < 2 or (i == n - 2 and second_last_low):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def expand_differences(order: int, d_weights: list[torch.Tensor], r: list[torch.Tensor]) -> list[float]:
    """Weights of M_0..M_{order-1} equal to sum_j d_weights[j] * D_j (float64 from float32 scalars)."""
    if order == 1:
        basis = [np.array([1.0])]
    elif order == 2:
        inv_r0 = (1.0 / r[0]).item()
        basis = [np.array([1.0, 0.0]), np.array([inv_r0, -inv_r0])]
    else:
        inv_r0, inv_r1 = (1.0 / r[0]).item(), (1.0 / r[1]).item()
        frac, inv_sum = (r[0] / (r[0] + r[1])).item(), (1.0 / (r[0] + r[1])).item()
        d1_0, d1_1 = np.array([inv_r0, -inv_r0, 0.0]), np.array([0.0, inv_r1, -inv_r1])
        basis = [np.array([1.0, 0.0, 0.0]), d1_0 + frac * (d1_0 - d1_1), inv_sum * (d1_0 - d1_1)]
    total = sum(w.item() * b for w, b in zip(d_weights, basis))
    return [float(v) for v in total]


def ring_rows(timesteps: np.ndarray, predictions: list[tuple[float, float]], steps: list[Coefficients],
              noise: bool) -> tuple[list[StepRow], int]:
    """StepRows of a multistep solver and its number of history slots S.

    predictions[i] = (x weight, model weight) of M at step i; steps[i] = (x weight, [weights of M_0,
    M_1, ...], noise weight). Step i reads M_k (k >= 1) from slot (i - k) % S and stores M_0 in slot
    i % S (not at the last step: nothing reads it).
    """
    n_slots = max(len(w) for _, w, _ in steps) - 1
    rows = []
    for i, (t, (m_x, m_model), (x_w, m_w, noise_w)) in enumerate(zip(timesteps, predictions, steps)):
        hist: dict[int, float] = {}
        for k, w in enumerate(m_w[1:], start=1):
            hist[(i - k) % n_slots] = hist.get((i - k) % n_slots, 0.0) + w
        out = Combo(x=x_w, x0=m_w[0], noise=noise_w, hist=hist)
        writes = [(i % n_slots, Combo(x0=1.0))] if n_slots and i < len(timesteps) - 1 else []
        rows.append(StepRow(timestep=float(t), c_in=1.0, x0_x=m_x, x0_model=m_model, out=out,
                            writes=writes, noise=noise))
    return rows, n_slots


def dpm_variant(config: dict, algorithms: tuple[str, ...], scheduler: str) -> tuple[str, str]:
    """(algorithm_type, solver_type) of a DPM-Solver config after diffusers' own substitutions (deis ->
    dpmsolver++; logrho, bh1, bh2 -> midpoint); a value outside ``algorithms`` / midpoint, heun is refused."""
    algorithm = config.get("algorithm_type", "dpmsolver++")
    algorithm = "dpmsolver++" if algorithm == "deis" else algorithm
    if algorithm not in algorithms:
        raise NotImplementedError(f"{scheduler}: algorithm_type={algorithm!r} is not reproduced ({', '.join(algorithms)})")
    solver_type = config.get("solver_type", "midpoint")
    solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
    if solver_type not in ("midpoint", "heun"):
        raise NotImplementedError(f"{scheduler}: solver_type={solver_type!r} is not reproduced (midpoint, heun)")
    return algorithm, solver_type
