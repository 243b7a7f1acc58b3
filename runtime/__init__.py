"""diffrt.runtime: denoisers, solver plans and the sampler (orchestration; pure Python + torch)."""
from .denoiser import Denoiser
from .sampler import Sampler, SamplerState
from .schedule import NoiseSchedule

__all__ = ["Denoiser", "NoiseSchedule", "Sampler", "SamplerState"]
