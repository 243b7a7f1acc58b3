"""diffrt.runtime: denoisers, solver plans, the sampler and optimize() (orchestration; pure Python + torch)."""
from .denoiser import Denoiser
from .optimized import OptimizedDenoiser, optimize
from .sampler import Sampler, SamplerState
from .schedule import NoiseSchedule

__all__ = ["Denoiser", "NoiseSchedule", "OptimizedDenoiser", "Sampler", "SamplerState", "optimize"]
