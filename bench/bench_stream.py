"""Streaming benchmark: SD-Turbo-shaped img2img through StreamPipeline, and a FlashLips-shaped lip-sync
pipeline, each with and without CUDA graphs: fps, input-to-output latency p50 / p99, GPU memory.

    python -m diffrt.bench.bench_stream --out DIR [--device cuda] [--workloads img2img,lipsync] [--quick]

Random weights (speed does not depend on their values), batch 1, one frame in, one frame out.

* **img2img**: an SD 2.1 / SD-Turbo-shaped UNet2DConditionModel (865M parameters, 64x64 latents at
  512^2, cross-attention to 77 x 1024 text embeddings) with a TAESD-shaped AutoencoderTiny, 1 stage
  (SD-Turbo's 1 step) and stream batches of 2 and 4 stages. StreamDiffusion reports 93.9 fps
  img2img on an RTX 4090 (1 step, TensorRT).
* **lipsync**: audio features (16 frames x 80 mel bins) -> a flow-matching transformer (width 256,
  4 layers, 4 heads: 3.3M parameters) predicting the 12-D lips-pose vector in 4 Euler steps ->
  a one-step latent editor UNet2DModel (85M parameters; inputs: the masked target latent, the
  reference latent and the tiled pose, 4 + 4 + 12 channels) -> the AutoencoderTiny decoder, at
  256^2 (32x32 latents) and 512^2 (64x64). Sizes: the pose model is small because a 12-D output
  from a short audio window needs little capacity and runs 4 times per frame; the editor is the
  largest stage, sized like FlashLips's UNet editor class (tens of millions of parameters) so that
  one step fits a few-millisecond budget on an H100 (FlashLips: 109.4 FPS for its UNet editor).

Latency is measured per frame from its submission to its output (a stream of n stages holds a
frame n ticks); fps is frames out per second of the steady state. ``--quick`` runs tiny shapes on
CPU: a smoke test of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable

import torch

from diffrt.runtime import Denoiser, NoiseSchedule, Sampler
from diffrt.runtime.graphs import GraphRunner
from diffrt.runtime.stream import StreamPipeline, vae_codec

from . import harness

log = logging.getLogger("bench.stream")
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "prediction_type": "epsilon"}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tiny_vae(quick: bool):
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    if quick:
        return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    return AutoencoderTiny()  # TAESD's shape: 8x downsampling, 4 latent channels


def _time_frames(step: Callable[[int], Any], frames: int, warmup: int, device: torch.device, lag: int
                 ) -> dict[str, Any]:
    """Run ``step(i)`` per frame; latency of frame i = time from its tick to the tick ``lag`` later."""
    for i in range(warmup):
        step(i)
    harness.sync(device)
    stamps = []
    for i in range(frames):
        stamps.append(time.perf_counter())
        step(warmup + i)
        harness.sync(device)
    stamps.append(time.perf_counter())
    ticks = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    latencies = sorted(stamps[i + lag + 1] - stamps[i] for i in range(frames - lag))
    return {"fps": 1.0 / harness.quantile(ticks, 0.5), "tick_ms_p50": 1e3 * harness.quantile(ticks, 0.5),
            "latency_ms_p50": 1e3 * harness.quantile(latencies, 0.5),
            "latency_ms_p99": 1e3 * harness.quantile(latencies, 0.99), "frames": frames}


def img2img_rows(args) -> list[dict[str, Any]]:
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.quick:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                    attention_head_dim=4, norm_num_groups=8)
        size, text = 64, torch.randn(1, 77, 16)
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        size, text = 512, torch.randn(1, 77, 1024)
    unet = unet.to(device, dtype).eval()
    vae = _tiny_vae(args.quick).to(device, dtype).eval()
    encode, decode = vae_codec(vae)
    den = Denoiser.from_diffusers(unet, SD_SCHEDULE)
    frame = (torch.rand(1, 3, size, size) * 2 - 1).to(device)
    latent_shape = tuple(encode(frame).shape[1:])
    rows = []
    for stages in (1, 2, 4):
        t_index = {1: (32,), 2: (32, 45), 4: (0, 16, 32, 45)}[stages]
        for graphs in (False, True) if device.type == "cuda" else (False,):
            pipe = StreamPipeline(den, t_index_list=t_index, cond=text.to(device, dtype), encode=encode,
                                  decode=decode, latent_shape=latent_shape, cuda_graphs=graphs, device=device)
            with torch.no_grad():
                timing = _time_frames(lambda i: pipe.tick(frame), args.frames, args.warmup, device, stages - 1)
            rows.append({"workload": "sd-turbo-img2img", "resolution": size, "stages": stages, "cuda_graphs": graphs,
                         "unet_parameters": _params(unet), "vae_parameters": _params(vae), **timing,
                         **_memory(device)})
    return rows


class PoseFlow(torch.nn.Module):
    """Flow-matching pose model: audio window [B, 16, 80] + noisy pose [B, 12] + t -> velocity [B, 12]."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.audio = torch.nn.Linear(80, width)
        self.pose = torch.nn.Linear(12, width)
        self.time = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.SiLU(), torch.nn.Linear(width, width))
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(width, 12)

    def forward(self, pose: torch.Tensor, t: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([(self.pose(pose) + self.time(t.reshape(-1, 1) / 1000))[:, None], self.audio(audio)], 1)
        return self.out(self.body(tokens)[:, 0])


def lipsync_rows(args) -> list[dict[str, Any]]:
    from diffusers import UNet2DModel  # noqa: PLC0415

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = _tiny_vae(args.quick).to(device, dtype).eval()
    encode, decode = vae_codec(vae)
    pose_model = (PoseFlow(32, 1, 2) if args.quick else PoseFlow()).to(device, dtype).eval()
    pose_den = Denoiser(pose_model, NoiseSchedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                              "num_train_timesteps": 1000, "shift": 1.0}),
                        sample_shape=(12,), call=lambda m, x, t, c: m(x, t, c))
    pose_sampler = Sampler(pose_den, "flow-euler", 4)
    rows = []
    for size in ((64,) if args.quick else (256, 512)):
        channels = (16, 32) if args.quick else (128, 256, 384, 512)
        editor = UNet2DModel(sample_size=size // 8, in_channels=20, out_channels=4, layers_per_block=1 if args.quick else 2,
                             block_out_channels=channels, norm_num_groups=8 if args.quick else 32,
                             down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
                             up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1))
        editor = editor.to(device, dtype).eval()
        reference = encode((torch.rand(1, 3, size, size, device=device) * 2 - 1))
        target = (torch.rand(1, 3, size, size, device=device) * 2 - 1)
        mask = torch.ones(1, 1, size, size, device=device)
        mask[:, :, size // 2:] = 0  # the mouth half is masked out
        audio = torch.randn(1, 16, 80, device=device, dtype=dtype)
        zero_t = torch.zeros(1, device=device)

        def frame_fn(target_frame, audio_window, noise):
            pose = pose_sampler.sample(noise, cond=audio_window, check=False)
            masked = encode(target_frame * mask)
            tiled = pose.float().reshape(1, 12, 1, 1).expand(1, 12, *masked.shape[2:])
            edited = editor(torch.cat([masked, reference, tiled], 1).to(dtype), zero_t).sample
            return decode(edited.float())

        for graphs in (False, True) if device.type == "cuda" else (False,):
            run = GraphRunner(frame_fn) if graphs else frame_fn
            noise = torch.randn(1, 12, device=device)
            with torch.no_grad():
                timing = _time_frames(lambda i: run(target, audio, noise), args.frames, args.warmup, device, 0)
            rows.append({"workload": "lipsync", "resolution": size, "stages": 1, "cuda_graphs": graphs,
                         "pose_parameters": _params(pose_model), "editor_parameters": _params(editor),
                         "vae_parameters": _params(vae), "pose_euler_steps": 4, **timing, **_memory(device)})
    return rows


def _memory(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"peak_gpu_memory_mb": None}
    return {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.bench_stream", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="img2img,lipsync")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    rows = []
    workloads = {"img2img": img2img_rows, "lipsync": lipsync_rows}
    for name in args.workloads.split(","):
        rows.extend(workloads[name](args))
    print(harness.format_table(rows, [
        ("workload", lambda r: r["workload"]), ("res", lambda r: r["resolution"]), ("stages", lambda r: r["stages"]),
        ("graphs", lambda r: r["cuda_graphs"]), ("fps", lambda r: r["fps"]), ("p50 ms", lambda r: r["latency_ms_p50"]),
        ("p99 ms", lambda r: r["latency_ms_p99"]), ("GPU MB", lambda r: r["peak_gpu_memory_mb"])]))
    print(f"wrote {harness.write_results(args.out, 'stream', rows, harness.environment_stamp(args.device))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
