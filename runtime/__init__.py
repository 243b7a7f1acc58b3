"""diffrt.runtime: denoisers, solver plans, the sampler, optimize() and accelerate(pipe) (orchestration; pure Python + torch)."""
from .denoiser import Denoiser
from .optimized import OptimizedDenoiser, optimize
from .pipeline import accelerate, restore
from .sampler import Sampler, SamplerState
from .schedule import NoiseSchedule

__all__ = ["Denoiser", "NoiseSchedule", "OptimizedDenoiser", "Sampler", "SamplerState", "accelerate", "optimize",
           "restore"]
