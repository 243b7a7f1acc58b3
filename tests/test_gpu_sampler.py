"""GPU tier: the whole sampling loop captured in one CUDA graph equals eager, with no host syncs."""
import pytest
import torch

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from parity import ToyModel

SOLVERS = ["ddim", "euler", "dpmpp-2m", "dpmpp-3m", "unipc", "deis", "heun"]


def _sampler(solver: str, backend: str = "auto") -> Sampler:
    den = Denoiser(ToyModel().cuda(), NoiseSchedule.linear(), sample_shape=(4, 16, 16))
    return Sampler(den, solver, 10, guidance_scale=2.5, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_whole_loop_graph_equals_eager(solver):
    sampler = _sampler(solver)
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(2, 4, 16, 16, device="cuda", generator=gen)
    other = torch.randn(2, 4, 16, 16, device="cuda", generator=gen)
    cond, uncond = torch.tensor([1, 2], device="cuda"), torch.tensor([9, 9], device="cuda")
    eager = sampler.sample(noise, cond=cond, uncond=uncond)
    eager_other = sampler.sample(other, cond=cond, uncond=uncond)

    static_noise = noise.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler.sample(static_noise, cond=cond, uncond=uncond, check=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sampler.sample(static_noise, cond=cond, uncond=uncond, check=False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    static_noise.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager_other)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc"])
def test_no_host_sync_in_the_loop(solver):
    sampler = _sampler(solver)
    noise = torch.randn(2, 4, 16, 16, device="cuda")
    cond, uncond = torch.tensor([1, 2], device="cuda"), torch.tensor([9, 9], device="cuda")
    sampler.sample(noise, cond=cond, uncond=uncond)  # builds the device tables once
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(noise, cond=cond, uncond=uncond, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_backend_equals_reference(solver):
    noise = torch.randn(2, 4, 16, 16, device="cuda")
    cond, uncond = torch.tensor([1, 2], device="cuda"), torch.tensor([9, 9], device="cuda")
    ref = _sampler(solver, "reference").sample(noise, cond=cond, uncond=uncond)
    fast = _sampler(solver, "cuda").sample(noise, cond=cond, uncond=uncond)
    assert ((fast - ref).abs().max() / ref.abs().max()).item() <= 1e-6
