"""Noise schedules: the training-time discretisation a denoiser was trained on.

A :class:`NoiseSchedule` holds what a diffusers scheduler config describes before any
``set_timesteps``: the betas and ``alphas_cumprod`` of a discrete VP model (computed
exactly as diffusers does, in float32), or the shift of a flow-matching model. Solver
plans (``diffrt.runtime.solvers``) derive their timesteps and sigmas from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999, kind: str = "cosine") -> torch.Tensor:
    """Betas that discretise alpha_bar(t): beta_i = min(1 - abar((i+1)/N) / abar(i/N), max_beta)."""
    if kind == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "exp":
        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"unknown alpha_bar transform {kind!r}; expected 'cosine' or 'exp'")
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """The training noise schedule of a denoiser.

    kind: ``"vp"`` (discrete betas / alphas_cumprod, DDPM-style) or ``"flow"`` (rectified
    flow, x_t = (1 - sigma) x0 + sigma * noise, sigma = t / num_train_timesteps). A flow ``shift`` is
    the fixed one; with ``use_dynamic_shifting`` it is 1 (the solver shifts its grid by the ``mu`` it is given).
    ``config`` keeps the full scheduler config it came from (solvers read their options there).
    """

    kind: str
    num_train_timesteps: int
    prediction_type: str
    betas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0
    config: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, prediction_type: str | None = None) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (a dict or a ``FrozenDict``) or a scheduler."""
        cls_name = ""
        if hasattr(config, "config") and not isinstance(config, Mapping):
            cls_name = type(config).__name__
            config = config.config
        cfg = dict(config)
        cls_name = cfg.get("_class_name", cls_name)
        n = int(cfg.get("num_train_timesteps", 1000))
        # Flow-matching configs name their class, or carry a shift and no betas.
        is_flow = ("FlowMatch" in cls_name or cfg.get("prediction_type") == "flow" or cfg.get("use_flow_sigmas", False)
                   or ("shift" in cfg and "beta_start" not in cfg and "trained_betas" not in cfg))
        if is_flow:
            ptype = prediction_type or "flow"
            _check_prediction_type(ptype)
            return cls("flow", n, ptype, shift=_flow_shift(cfg), config=cfg)
        ptype = prediction_type or cfg.get("prediction_type", "epsilon")
        _check_prediction_type(ptype)
        betas = _betas_from_config(cfg, n)
        if cfg.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # zero-SNR: the last entry is 0; sigma-space solvers clamp it
        return cls("vp", n, ptype, betas=betas, alphas_cumprod=alphas_cumprod, config=cfg)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               prediction_type: str = "epsilon") -> "NoiseSchedule":
        """A DDPM linear-beta schedule (the default of diffusers' DDPMScheduler)."""
        return cls.from_config({"num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                                "beta_end": beta_end, "beta_schedule": "linear", "prediction_type": prediction_type})

    @property
    def sigmas(self) -> torch.Tensor:
        """Training noise levels per timestep: VP: sqrt((1 - abar) / abar) (diffusers' sigmas); flow:
        the shifted sigma s' = shift s / (1 + (shift - 1) s) at s = t / T, t = 1..T."""
        if self.kind == "vp":
            return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        s = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float32) / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def with_config(self, **overrides: Any) -> "NoiseSchedule":
        """A copy whose config has ``overrides`` applied (the schedule itself is shared)."""
        return NoiseSchedule(self.kind, self.num_train_timesteps, self.prediction_type, self.betas,
                             self.alphas_cumprod, self.shift, {**self.config, **overrides})


def _flow_shift(cfg: dict) -> float:
    """The fixed shift of a flow config; 1 with use_dynamic_shifting (diffusers leaves its training sigmas
    unshifted then and shifts the inference grid from the pipeline's mu at set_timesteps)."""
    if cfg.get("use_dynamic_shifting", False):
        return 1.0
    return float(cfg.get("shift", cfg.get("flow_shift", 1.0)) or 1.0)


def _check_prediction_type(ptype: str) -> None:
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {ptype!r} is not one of {PREDICTION_TYPES}")


def _betas_from_config(cfg: dict, n: int) -> torch.Tensor:
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise NotImplementedError(f"beta_schedule={schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2, trained_betas)")
