"""Train the shipped reference models (seeded; runs on 2 CPU cores, uses a GPU where there is one).

    python -m diffrt.runtime.models.train --model digits-dit|digits-unet|digits-classifier|digits-dit-exits
        [--steps N] [--max-minutes M] [--out DIR] [--seed S] [--eval-only] [--every K]

Denoisers: DDPM training on the digits train split (``digits.load_digits("train")``: 1500 images,
16x16, 1 channel, [-1, 1]) under the linear-beta schedule (1e-4..0.02, 1000 steps). Per step: a
batch x0 (epoch-wise shuffled by a seeded generator), t ~ U{0..999}, eps ~ N(0, I),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, labels replaced by the null class (10) with p = 0.1,
and loss = mean(w_t |f(x_t, t, y) - target|^2) with the v-prediction target
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 and the min-SNR weight w_t = min(SNR_t, 5) / (SNR_t + 1)
(Hang et al. 2023; for ``--prediction-type epsilon``: target eps, w_t = min(SNR_t, 5) / SNR_t).

Why v and not epsilon: this schedule ends at sqrt(abar_T) = 0.0064, so an epsilon model's
x0 = (x - sigma eps) / alpha multiplies its noise error by ~150 at the first solver steps; an
epsilon DiT trained for 1000 steps gave samples out to |x| = 30 under DPM-Solver++ 2M and 48%
class accuracy at CFG 3, the same run with v-prediction (and lr 1e-3) gave ~100%.

AdamW, linear warm-up then cosine decay to 10% of the peak rate over the planned steps, bf16
autocast (fp32 master weights), gradient clipping at 1, an EMA of the weights (the EMA is shipped,
stored as float16 safetensors). Deterministic for a seed and a thread count. Training stops after
``--steps`` or when ``--max-minutes`` of training run out, whichever is first; the card says which.

Outputs ``<out>/<name>.safetensors`` and ``<out>/<name>.json`` (the model card: architecture,
parameter count, data, schedule, training record, final loss, and "baselines": class accuracy and
digits-FID per solver setting, measured by :mod:`diffrt.runtime.models.baselines`).
``--eval-only`` re-measures the baselines of existing weights; ``--no-eval`` skips them.
``--model digits-classifier`` runs the classifier's trainer (:func:`digits.train_classifier
<diffrt.runtime.models.digits.train_classifier>`, then the digits-FID floor of :mod:`diffrt.runtime.quality`);
``--model digits-dit-exits`` trains the shipped DiT's exit heads with its backbone frozen
(:func:`exits.train_exit_heads <diffrt.runtime.models.exits.train_exit_heads>`; ``--every K``: an exit
after every K blocks; default 1500 steps).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import models
from . import baselines
from ..schedule import NoiseSchedule
from .dit import DigitsDiT

log = logging.getLogger("diffrt.runtime.models.train")

SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
            "beta_end": 0.02, "beta_schedule": "linear"}

DIT_CONFIG = {"sample_size": 16, "in_channels": 1, "patch_size": 2, "hidden_size": 256, "num_blocks": 6,
              "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 10, "freq_dim": 256}

UNET_CONFIG = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
               "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
               "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 32,
               "norm_num_groups": 8, "num_class_embeds": models.NULL_CLASS + 1}

# Training recipe per model; the defaults reproduce the shipped weights.
RECIPES: dict[str, dict[str, Any]] = {
    "digits-dit": {"steps": 2500, "max_minutes": 25.0, "batch_size": 64, "lr": 1e-3, "warmup": 200,
                   "prediction_type": "v_prediction"},
    "digits-unet": {"steps": 4000, "max_minutes": 20.0, "batch_size": 64, "lr": 1e-3, "warmup": 200,
                    "prediction_type": "v_prediction"},
}
COMMON = {"weight_decay": 0.01, "ema_decay": 0.999, "label_dropout": 0.1, "min_snr_gamma": 5.0,
          "grad_clip": 1.0, "min_lr_ratio": 0.1, "precision": "bf16"}


def architecture(name: str) -> dict[str, Any]:
    """The card's architecture entry of a denoiser."""
    if name == "digits-dit":
        return {"class": "DigitsDiT", "config": dict(DIT_CONFIG)}
    return {"class": "UNet2DModel", "config": dict(UNET_CONFIG)}


def scheduler_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The training noise schedule (a diffusers DDPMScheduler config) with the recipe's prediction type."""
    return {**SCHEDULE, "prediction_type": args.prediction_type or RECIPES[name]["prediction_type"]}


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_output(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, DigitsDiT):
        return model(x, t, y)
    return model(x, t, class_labels=y).sample


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter-wise."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def train_denoiser(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``name``; return the training record (the EMA model under "ema")."""
    recipe = {**COMMON, **RECIPES[name]}
    if args.lr is not None:
        recipe["lr"] = args.lr
    steps = args.steps or recipe["steps"]
    max_minutes = args.max_minutes if args.max_minutes is not None else recipe["max_minutes"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = models.load_digits(split="train")
    model = models.build_model(architecture(name)).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters, %d training images, %d steps or %.1f min on %s",
             name, params / 1e6, len(images), steps, max_minutes, device)

    schedule = NoiseSchedule.from_config(scheduler_config(name, args))
    abar = schedule.alphas_cumprod.to(device)
    snr = abar / (1 - abar)
    recipe["prediction_type"] = schedule.prediction_type
    v_pred = schedule.prediction_type == "v_prediction"
    loss_weight = snr.clamp(max=recipe["min_snr_gamma"]) / (snr + 1 if v_pred else snr)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    amp = recipe["precision"] == "bf16"

    order, cursor, batch = torch.randperm(len(images), generator=gen), 0, recipe["batch_size"]
    loss_ema = mse_ema = None
    start, done, stopped_by = time.perf_counter(), 0, "steps"
    bar = tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        x0, y = images[idx].to(device), labels[idx].to(device)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        drop = torch.rand(batch, generator=gen).to(device) < recipe["label_dropout"]
        y = torch.where(drop, torch.full_like(y, models.NULL_CLASS), y)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe["lr"], recipe["warmup"], steps, recipe["min_lr_ratio"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model_output(model, x_t, t.float(), y)
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v_pred else eps
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        opt.step()
        ema_update(ema, model, min(recipe["ema_decay"], (1 + step) / (10 + step)))

        loss_v, mse_v = loss.item(), per_sample.mean().item()
        loss_ema = loss_v if loss_ema is None else 0.99 * loss_ema + 0.01 * loss_v
        mse_ema = mse_v if mse_ema is None else 0.99 * mse_ema + 0.01 * mse_v
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", mse=f"{mse_ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        if done % args.log_every == 0:
            log.info("step %d/%d loss(ema) %.5f mse(ema) %.5f %.1f s", done, steps, loss_ema, mse_ema,
                     time.perf_counter() - start)
        if time.perf_counter() - start > max_minutes * 60 and done < steps:
            stopped_by = "time"
            log.warning("time budget of %.1f min reached after %d of %d steps", max_minutes, done, steps)
            break
    bar.close()
    wall = time.perf_counter() - start
    return {"ema": ema, "parameters": params, "scheduler": dict(schedule.config), "data_count": len(images), "device": str(device), "record": {
        "steps_done": done, "steps_planned": steps, "stopped_by": stopped_by, "max_minutes": max_minutes,
        "wall_time_s": round(wall, 1), "seconds_per_step": round(wall / max(done, 1), 4),
        "final_loss": round(loss_ema, 6), "final_loss_note": "EMA (0.99) of the min-SNR-weighted training loss",
        "final_mse": round(mse_ema, 6), "final_mse_note": "EMA (0.99) of the unweighted MSE to the target",
        "optimizer": "AdamW", "lr_schedule": "linear warm-up, cosine to min_lr_ratio * lr",
        "objective": f"{schedule.prediction_type} target, MSE weighted by min(SNR, gamma) / "
                     f"{'(SNR + 1)' if v_pred else 'SNR'} (min-SNR-gamma)", **recipe}}


def save_denoiser(name: str, result: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the EMA weights (float16 safetensors) and the model card; return the card."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in result["ema"].state_dict().items()}
    weights = out / f"{name}.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "model": name, "dtype": "float16"})
    card = {
        "name": name,
        "architecture": architecture(name),
        "parameters": result["parameters"],
        "sample_shape": [1, 16, 16],
        "prediction_type": result["scheduler"]["prediction_type"],
        "null_class": models.NULL_CLASS,
        "scheduler": result["scheduler"],
        "data": data_description(result["data_count"]),
        "training": {**result["record"], "seed": args.seed, "device": result["device"], "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "diffusers": _diffusers_version(),
                     "python": platform.python_version(), "date": datetime.date.today().isoformat()},
        "weights": {"file": weights.name, "dtype": "float16", "bytes": weights.stat().st_size,
                    "note": "EMA of the training weights"},
    }
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def data_description(count: int) -> dict[str, Any]:
    from .digits import SPLIT_SEED, split_indices  # noqa: PLC0415

    train, heldout = (len(index) for index in split_indices())
    return {"source": "sklearn.datasets.load_digits (8x8, values 0..16)", "resolution": [16, 16], "channels": 1,
            "range": [-1.0, 1.0], "preprocessing": "v / 16, bilinear upsample 8->16 (align_corners=False), * 2 - 1",
            "trained_on": "train", "count": count, "split": {"train": train, "heldout": heldout, "seed": SPLIT_SEED},
            "classes": 10, "loader": "diffrt.runtime.models.digits.load_digits(split='train')"}


def _diffusers_version() -> str | None:
    try:
        import diffusers  # noqa: PLC0415
        return diffusers.__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.runtime.models.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=[*models.MODEL_NAMES, "digits-classifier", "digits-dit-exits"])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped recipe's)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    parser.add_argument("--out", type=Path, default=models.WEIGHTS_DIR, help="where weights and card go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda where available)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="what the model predicts (default: the recipe's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--eval-only", action="store_true", help="re-measure the baselines of existing weights")
    parser.add_argument("--no-eval", action="store_true", help="skip the baselines after training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--every", type=int, default=1, help="digits-dit-exits: an exit after every K blocks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "digits-classifier":
        return train_classifier(args)
    if args.model == "digits-dit-exits":
        return train_exits(args)
    if not args.eval_only:
        result = train_denoiser(args.model, args)
        save_denoiser(args.model, result, args.out, args)
    if args.eval_only or not args.no_eval:
        entry = baselines.update_card(args.model, weights_dir=args.out)
        log.info("baselines of %s: %s", args.model, json.dumps(entry["goals"]))
    return 0


def train_classifier(args: argparse.Namespace) -> int:
    """Train the digits classifier, measure the digits-FID floor with it, write its weights and card."""
    from .. import quality  # noqa: PLC0415
    from . import digits  # noqa: PLC0415 - it needs scikit-learn for the data

    steps = args.steps or digits.TRAIN_RECIPE["steps"]
    model, card = digits.train_classifier(seed=args.seed, steps=steps)
    card["metrics"]["fid_floor"] = {"value": round(quality.fid_floor(seed=0, classifier=model), 6),
                                    "n_samples": quality.FID_MIN_SAMPLES, "seed": 0,
                                    "definition": quality.FID_FLOOR_DEFINITION}
    digits.save_classifier(model, card, args.out)
    return 0


def train_exits(args: argparse.Namespace) -> int:
    """Train the shipped digits DiT's exit heads (backbone frozen); write them beside its weights."""
    from . import exits  # noqa: PLC0415

    den = models.load("digits-dit", weights_dir=args.out)
    heads, record = exits.train_exit_heads(den.model, den.schedule, args.every, args.steps or 1500, seed=args.seed)
    exits.save_exit_heads(heads, record, args.out)
    log.info("wrote the exit heads into %s (card %s)", args.out, models.card("digits-dit", args.out)["exit_heads"]["file"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
