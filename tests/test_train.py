"""The reference denoisers' trainer (diffrt.runtime.models.train): seeded, saved, loadable."""
import argparse
import json

import torch
from diffrt.runtime import models
from diffrt.runtime.models import train


def _args(**overrides) -> argparse.Namespace:
    values = {"lr": None, "steps": 2, "max_minutes": None, "device": "cpu", "seed": 5, "log_every": 100,
              "prediction_type": None}
    return argparse.Namespace(**{**values, **overrides})


def test_training_is_deterministic_and_the_card_describes_it(tmp_path):
    first = train.train_denoiser("digits-unet", _args())
    second = train.train_denoiser("digits-unet", _args())
    for (name, a), (_, b) in zip(first["ema"].state_dict().items(), second["ema"].state_dict().items()):
        assert torch.equal(a, b), name
    other_seed = train.train_denoiser("digits-unet", _args(seed=6))
    assert any(not torch.equal(a, b) for a, b in zip(first["ema"].state_dict().values(),
                                                      other_seed["ema"].state_dict().values()))
    card = train.save_denoiser("digits-unet", first, tmp_path, _args())
    assert card["training"]["steps_done"] == 2 and card["training"]["stopped_by"] == "steps"
    assert card["training"]["seed"] == 5 and card["training"]["threads"] == torch.get_num_threads()
    assert card["prediction_type"] == "v_prediction" == card["scheduler"]["prediction_type"]
    assert json.loads((tmp_path / "digits-unet.json").read_text()) == card
    den = models.load("digits-unet", weights_dir=tmp_path)
    assert den.prediction_type == "v_prediction" and den.sample_shape == (1, 16, 16)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    rates = [train.lr_at(step, 1e-3, 10, 100, 0.1) for step in range(100)]
    assert rates[0] == 1e-4 and rates[9] == 1e-3
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert abs(train.lr_at(100, 1e-3, 10, 100, 0.1) - 1e-4) < 1e-12


def test_the_exit_heads_command_trains_and_ships_loadable_heads(tmp_path):
    import shutil

    for name in ("digits-dit.json", "digits-dit.safetensors"):
        shutil.copy(models.WEIGHTS_DIR / name, tmp_path / name)
    assert train.main(["--model", "digits-dit-exits", "--steps", "2", "--every", "3", "--out", str(tmp_path)]) == 0
    record = models.card("digits-dit", tmp_path)["exit_heads"]
    assert record["steps"] == 2 and record["depths"] == [3]
    heads = models.load("digits-dit", weights_dir=tmp_path).model.exit_heads
    assert heads is not None and heads.depths == [3]
