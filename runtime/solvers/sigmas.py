"""Shared noise-level maths for solver plans (numpy float64, as diffusers computes its grids).

VP models are handled in diffusers' "VE" parametrisation: sigma_hat = sqrt((1 - abar) / abar),
with alpha = 1 / sqrt(sigma_hat^2 + 1), sigma = sigma_hat * alpha, lambda = log alpha - log sigma.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def ve_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_hat_t = sqrt((1 - abar_t) / abar_t) for every training timestep (float32 maths, as diffusers)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def alpha_sigma(sigma_hat: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of a VP model at VE noise level sigma_hat."""
    alpha = 1.0 / (sigma_hat**2 + 1) ** 0.5
    return alpha, sigma_hat * alpha


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log sigma."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending: (max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def data_prediction(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(x_coef, model_coef) with x0 = x_coef * x + model_coef * m for x = alpha x0 + sigma eps.

    epsilon: x0 = (x - sigma m) / alpha; v_prediction: x0 = alpha x - sigma m; sample: x0 = m;
    flow (x = (1 - s) x0 + s eps, m = eps - x0, so alpha = 1 - s): x0 = x - sigma m.
    """
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow":
        return 1.0, -sigma
    raise NotImplementedError(f"prediction_type={prediction_type!r} is not supported by this solver")


def multistep_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int = 0,
                        last_timestep: int | None = None) -> np.ndarray:
    """Descending int64 timestep grid of diffusers' multistep schedulers (DPM-Solver, DEIS, UniPC).

    The grid has ``steps + 1`` points of which the smallest is dropped:
    linspace: round(linspace(0, last - 1, steps + 1))[::-1][:-1];
    leading:  (arange(steps + 1) * (last // (steps + 1)))[::-1][:-1] + steps_offset;
    trailing: round(arange(last, 0, -num_train / steps)) - 1 (its length can differ from ``steps``
    when ``last`` < ``num_train``). ``last_timestep`` (default ``num_train``) is DPM-Solver's
    lambda_min_clipped cut-off.
    """
    last = num_train if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train / steps
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise NotImplementedError(f"timestep_spacing={spacing!r} is not supported (linspace, leading, trailing)")


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma, descending: exp(linspace(log max, log min, num_steps))."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def zero_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """diffusers' sigma-space schedulers with rescale_betas_zero_snr set abar[-1] = 2**-24 (so sigma_max ~ 4096
    stays finite); NoiseSchedule keeps the raw cumprod (abar[-1] = 0). Returns a copy."""
    abar = alphas_cumprod.clone()
    abar[-1] = 2**-24
    return abar


def final_sigma(config: dict, alphas_cumprod: torch.Tensor, scheduler: str) -> float:
    """The level after the last step, diffusers' ``final_sigmas_type``: "zero", or "sigma_min" (the training
    schedule's smallest, sqrt((1 - abar_0) / abar_0), in float32 as diffusers computes it)."""
    final = config.get("final_sigmas_type", "zero")
    if final == "zero":
        return 0.0
    if final == "sigma_min":
        return (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item()
    raise NotImplementedError(f"{scheduler}: final_sigmas_type={final!r} is not reproduced (zero, sigma_min)")
