"""``diffrt bench --pipeline``: a zoo architecture inside its real diffusers pipeline class, timed whole.

The workload's model (random weights, :mod:`diffrt.bench.zoo`) becomes the denoiser of the pipeline its
users run (StableDiffusionPipeline for sd15-unet and sd-turbo-stream, StableDiffusionXLPipeline,
DiTPipeline, FluxPipeline for flux-like), with a small random VAE of the right scale factor (latents are
returned, so it only sets the latent size; DiTPipeline always decodes) and prompt embeddings in place of
text encoders. Rows, on the same inputs and generator, timed in interleaved rounds as ``diffrt bench``
does (:func:`~diffrt.bench.benchmark.time_rows`):

* ``diffusers-eager``: the pipeline as it is, in the benchmark dtype;
* ``diffusers-compile``: the same with ``torch.compile`` on (a copy of) its denoiser;
* ``exact``: ``diffrt.runtime.accelerate(pipe)`` with no approximation (fused step, diffrt attention);
* ``graphs``: ``accelerate(pipe, cuda_graphs=True)``: the same, each denoiser call replayed from a CUDA graph;
* ``tuned``: ``accelerate(pipe, config=FILE)`` with a ``diffrt tune`` file (``--config``).

PSNR is against the fp32 pipeline's output. Families without a pipeline class (lipsync, the digits
models, a model folder) are refused with a message.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffrt.runtime import accelerate

from .benchmark import _speedups, prepare_row, time_rows
from .zoo import Workload

log = logging.getLogger(__name__)

PIPELINES = ("sd15-unet", "sd-turbo-stream", "sdxl-unet", "dit-xl-2", "flux-like")


def _vae(latent_channels: int, factor: int = 8):
    """A small random AutoencoderKL whose scale factor is ``factor`` (what the pipeline reads from it)."""
    from diffusers import AutoencoderKL  # noqa: PLC0415

    blocks = factor.bit_length()  # 2 ** (blocks - 1) == factor
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(8,) * blocks, norm_num_groups=8, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks).eval()


def build_pipeline(workload: Workload, batch: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(pipeline, call arguments) of the workload's model in its diffusers pipeline class."""
    import diffusers  # noqa: PLC0415

    name, model = workload.name, workload.den.model
    if name not in PIPELINES:
        raise ValueError(f"--pipeline: {name} has no diffusers pipeline class here; one of {', '.join(PIPELINES)}")
    config = {k: v for k, v in workload.scheduler_config.items() if not k.startswith("_")}
    steps, guidance = workload.steps, workload.guidance_scale
    pixels = workload.resolution
    cond = workload.make_cond(batch, seed)
    uncond = workload.make_uncond(batch) if workload.make_uncond is not None else None
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent"}
    if name in ("sd15-unet", "sd-turbo-stream"):
        scheduler_cls = diffusers.DPMSolverMultistepScheduler if name == "sd15-unet" else diffusers.EulerDiscreteScheduler
        pipe = diffusers.StableDiffusionPipeline(vae=_vae(4), text_encoder=None, tokenizer=None, unet=model,
                                                 scheduler=scheduler_cls.from_config(config), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        kwargs.update(prompt_embeds=cond, height=pixels, width=pixels, guidance_scale=guidance or 0.0)
        if uncond is not None:
            kwargs["negative_prompt_embeds"] = uncond
    elif name == "sdxl-unet":
        pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
        pipe = diffusers.StableDiffusionXLPipeline(vae=_vae(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=model,
                                                   scheduler=diffusers.DPMSolverMultistepScheduler.from_config(config))
        kwargs.update(prompt_embeds=cond[:, :-1], pooled_prompt_embeds=cond[:, -1, :pooled],
                      negative_prompt_embeds=uncond[:, :-1], negative_pooled_prompt_embeds=uncond[:, -1, :pooled],
                      height=pixels, width=pixels, guidance_scale=guidance)
    elif name == "dit-xl-2":
        pipe = diffusers.DiTPipeline(transformer=model, vae=_vae(4), id2label={i: str(i) for i in range(1000)},
                                     scheduler=diffusers.DPMSolverMultistepScheduler.from_config(config))
        kwargs = {"class_labels": cond.tolist(), "num_inference_steps": steps, "guidance_scale": guidance,
                  "output_type": "np"}
    else:  # flux-like
        pooled = model.config.pooled_projection_dim
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(config),
                                      vae=_vae(16), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                      tokenizer_2=None, transformer=model)
        kwargs.update(prompt_embeds=cond[:, :-1], pooled_prompt_embeds=cond[:, -1, :pooled], height=pixels,
                      width=pixels, guidance_scale=0.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(workload.den.device or "cpu"), kwargs


def _caller(pipe, kwargs: dict[str, Any], seed: int) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images
        return torch.as_tensor(out).float()
    return call


def _variant(pipe, dtype: torch.dtype, copy_denoiser: bool):
    """A pipeline sharing ``pipe``'s parts, its denoiser converted to ``dtype`` (copied when asked or needed)."""
    parts = dict(pipe.components)
    name = "unet" if "unet" in parts else "transformer"
    model = parts[name]
    if copy_denoiser or next(model.parameters()).dtype != dtype:
        parts[name] = copy.deepcopy(model).to(dtype)
    if parts.get("vae") is not None and parts["vae"].dtype != dtype:
        parts["vae"] = copy.deepcopy(parts["vae"]).to(dtype)  # small; DiTPipeline decodes with it
    variant = type(pipe)(**{k: v for k, v in parts.items() if k in _init_names(type(pipe))})
    variant.set_progress_bar_config(disable=True)
    return variant, name


def _init_names(cls) -> set[str]:
    import inspect  # noqa: PLC0415

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _cast_conditions(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


ROWS = ("diffusers-eager", "diffusers-compile", "exact")


def run(workload: Workload, batch: int = 1, configs: list[str] | None = None, dtype: torch.dtype | None = None,
        tuned: str | Path | None = None, warmup: int = 2, repeats: int = 10, max_seconds: float | None = 60.0,
        compile_mode: str | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The pipeline rows (module docstring; ``configs``: a subset of :data:`ROWS`, default all) for ``workload``:
    {"rows", "workload", "settings"} as ``diffrt bench``."""
    device = workload.den.device or torch.device("cpu")
    default = [*ROWS, "graphs"] if device.type == "cuda" else list(ROWS)  # off CUDA "graphs" would be "exact" again
    names = default if not configs or configs == ["all"] else list(dict.fromkeys(configs))
    unknown = [n for n in names if n not in (*ROWS, "graphs")]
    if unknown:
        raise ValueError(f"--pipeline rows are {', '.join(ROWS)}, graphs (and 'tuned' with --config); got "
                         f"{', '.join(unknown)}")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    compile_mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    pipe, kwargs = build_pipeline(workload, batch, seed)
    with torch.no_grad():
        reference = _caller(pipe, kwargs, seed)()
    typed_kwargs = _cast_conditions(kwargs, dtype)

    def eager():
        variant, _ = _variant(pipe, dtype, copy_denoiser=False)
        return _caller(variant, typed_kwargs, seed)

    def compiled():
        variant, name = _variant(pipe, dtype, copy_denoiser=True)
        setattr(variant, name, torch.compile(getattr(variant, name), mode=compile_mode))
        return _caller(variant, typed_kwargs, seed)

    def diffrt(config: str | Path | None, **options: Any) -> Callable[[], Callable[[], torch.Tensor]]:
        def build():
            variant, _ = _variant(pipe, dtype, copy_denoiser=True)
            accelerate(variant, config=config, **options)
            return _caller(variant, typed_kwargs, seed)
        return build

    builders = {"diffusers-eager": ("baseline", eager), "diffusers-compile": ("baseline", compiled),
                "exact": ("diffrt", diffrt(None)), "graphs": ("diffrt", diffrt(None, cuda_graphs=True))}
    jobs = [(name, *builders[name]) for name in names]
    if tuned is not None:
        jobs.append(("tuned", "diffrt", diffrt(tuned)))
    rows, timed = [], []
    for name, kind, build in tqdm(jobs, desc=f"bench {workload.name} pipeline", unit="config", disable=not progress):
        row, fn = prepare_row(name, kind, build, reference, workload, device, warmup)
        if kind == "diffrt":
            options = {"exact": "", "graphs": ", cuda_graphs=True"}.get(name, f", config={tuned}")
            row.update({"exact": name in ("exact", "graphs"), "acceleration": f"accelerate(pipe{options})"})
        rows.append(row)
        if fn is not None:
            timed.append((row, fn))
    if timed:
        time_rows(timed, device, batch, repeats, max_seconds)
    _speedups(rows)
    summary = {**workload.summary(), "model": f"{workload.name}-pipeline",
               "description": f"{workload.description}, in {type(pipe).__name__}"}
    settings = {"batch": batch, "solver": type(pipe.scheduler).__name__, "steps": workload.steps,
                "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                "guidance_scale": kwargs.get("guidance_scale"), "seed": seed, "warmup": warmup, "repeats": repeats,
                "compile_mode": compile_mode, "interleaved": True, "mode": "pipeline",
                "reference": f"{type(pipe).__name__}, fp32, same inputs and generator"}
    return {"rows": rows, "workload": summary, "settings": settings}
