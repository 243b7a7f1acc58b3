"""``diffrt tune`` and the Acceleration config: the search keeps its quality floor, finds the known
answer on a model whose quality per step count is known, and writes a file optimize() accepts."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffrt.bench import tune, zoo  # noqa: E402
from diffrt.bench.benchmark import Inputs, diffusers_sample, diffusers_scheduler, psnr_db, scheduler_options  # noqa: E402
from diffrt.runtime import cli, models, optimize  # noqa: E402
from diffrt.runtime.acceleration import Acceleration  # noqa: E402
from diffrt.runtime.denoiser import Denoiser  # noqa: E402
from diffrt.runtime.schedule import NoiseSchedule  # noqa: E402


class GaussianData(torch.nn.Module):
    """The exact noise prediction for data x0 ~ N(mean, std^2) per pixel: E[eps | x_t] =
    sigma (x_t - a mean) / (a^2 std^2 + sigma^2), a = sqrt(abar_t), sigma = sqrt(1 - abar_t).
    Its samples converge to the probability-flow ODE's as the step count grows."""

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.3, std: float = 0.5):
        super().__init__()
        self.register_buffer("abar", schedule.alphas_cumprod.float())
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # gives the Denoiser its dtype
        self.mean, self.std = mean, std
        self.calls = 0

    def forward(self, x, t):
        self.calls += x.shape[0]
        abar = self.abar[torch.as_tensor(t).round().long().clamp(0, len(self.abar) - 1)].reshape(-1, 1, 1, 1)
        a, sigma2 = abar.sqrt(), 1 - abar
        return self.scale * sigma2.sqrt() * (x - a * self.mean) / (a**2 * self.std**2 + sigma2)


@pytest.fixture(scope="module")
def gaussian():
    config = {**zoo.SD_SCHEDULE}
    schedule = NoiseSchedule.from_config(config)
    den = Denoiser(GaussianData(schedule), schedule, sample_shape=(1, 8, 8))
    return zoo.Workload("gaussian", den, lambda batch, seed: None, None, solver="ddim", steps=20,
                        scheduler_config=config)


def _evaluations(acc, run):
    """The cost: model rows evaluated by one sample (deterministic, so the answer is known)."""
    before = GaussianData.last.calls
    run()
    return float(GaussianData.last.calls - before)


@pytest.fixture
def counted(gaussian):
    GaussianData.last = gaussian.den.model
    yield gaussian


def _psnr_per_steps(workload, counts):
    from diffrt.runtime import Sampler

    inputs = Inputs.make(workload, 4, tune.TUNE_SEED)
    reference = diffusers_sample(workload.den, diffusers_scheduler(workload, "ddim"), 20, inputs)
    out = {}
    for n in counts:
        x = Sampler(workload.den, "ddim", n, **scheduler_options(workload, "ddim")).sample(inputs.noise)
        out[n] = psnr_db(x, reference, None)[0]
    return out


def test_tuner_finds_the_known_answer_and_respects_its_floor(counted):
    counts = [c["steps"] for c in tune.candidates("steps", counted, torch.device("cpu"), 20, "default")]
    assert counts == [15, 10, 8, 5]
    quality = _psnr_per_steps(counted, counts)
    assert quality[15] > quality[10] > quality[8] > quality[5]  # the premise: fewer steps, further from the reference
    floor = (quality[10] + quality[8]) / 2  # so 10 steps is the cheapest configuration that meets it
    result = tune.tune(counted, floor, batch=4, axes=("steps", "int8"), latency=_evaluations, progress=False)
    assert result.best.acceleration.steps == 10 and result.best.acceleration.solver == "ddim"
    assert result.best.psnr_db >= floor
    assert result.best.psnr_db == pytest.approx(quality[10], abs=1e-6)
    assert result.baseline.latency == 20 * 4 and result.best.latency == 10 * 4 and result.speedup == 2.0
    verdicts = {(t.axis, t.acceleration.steps): t.verdict for t in result.trials}
    assert "pruned" in verdicts[("steps", 8)] and ("steps", 5) not in verdicts  # pruned after the first miss
    assert verdicts[("int8", 10)].startswith("error")  # no Linear layers to quantize: an error row, the search goes on
    anything = tune.tune(counted, 0.0, batch=4, axes=("steps",), latency=_evaluations, progress=False)
    assert anything.best.acceleration.steps == 5
    nothing = tune.tune(counted, 1000.0, batch=4, axes=("steps",), latency=_evaluations, progress=False)
    assert nothing.best is nothing.baseline and "below the floor" in nothing.best.verdict
    with pytest.raises(ValueError, match="finite"):
        tune.tune(counted, float("inf"), axes=("steps",), latency=_evaluations)


def test_tune_cli_writes_a_config_optimize_accepts_and_it_meets_the_floor(tmp_path, capsys):
    out = tmp_path / "tuned" / "dit.json"
    floor = 30.0
    code = cli.main(["tune", "--model", "digits-dit", "--quality-floor", str(floor), "--batch", "4", "--space", "quick",
                     "--axes", "steps,int8,adaptive-guidance", "--repeats", "1", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    document = json.loads(out.read_text())
    assert document["tuning"]["quality_floor_db"] == floor and document["tuning"]["trials"]
    acc = Acceleration.load(out)
    assert acc.steps is not None and acc.steps < 20  # 20 steps -> 10 keeps ~37 dB on this model
    # re-check the floor independently: the config through optimize(config=path) on the tuning seeds
    workload = zoo.workload("digits-dit")
    inputs = Inputs.make(workload, 4, tune.TUNE_SEED)
    reference = diffusers_sample(workload.den, diffusers_scheduler(workload, "dpmpp-2m"), 20, inputs)
    fast = optimize(workload.den, config=out)
    sampler = acc.sampler(fast, guidance_scale=3.0)
    with torch.no_grad():
        x = sampler.sample(inputs.noise, cond=inputs.cond, uncond=inputs.uncond)
    assert psnr_db(x, reference, 2.0)[0] >= floor
    if acc.int8:
        assert (out.parent / (acc.int8["path"] + ".json")).is_file()  # the calibration beside the config
    assert "chosen:" in printed and "optimize(den, config=" in printed


def test_acceleration_round_trip_and_refusals(tmp_path):
    acc = Acceleration(solver="unipc", steps=8, todo={"factor": {"1": 2}, "min_tokens": 0}, adaptive_guidance=0.95)
    path = acc.save(tmp_path / "a.json", extra={"note": "made by hand"})
    assert Acceleration.load(path) == acc and not acc.exact and Acceleration().exact
    assert "unipc/8" in acc.describe() and "todo=1:2" in acc.describe()
    fast = optimize(models.load("digits-unet"), config=path)
    assert fast.settings.todo.factor == {1: 2}  # JSON's string level keys become ints
    with pytest.raises(ValueError, match="dtype"):
        Acceleration(dtype="float8")
    with pytest.raises(ValueError, match="int8 must be"):
        Acceleration(int8="yes")
    with pytest.raises(ValueError, match="unknown acceleration option"):
        Acceleration.from_dict({"format": "diffrt-acceleration/1", "warp": 9})
    with pytest.raises(ValueError, match="not a diffrt-acceleration/1"):
        Acceleration.from_dict({"format": "other"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        Acceleration.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="diffrt tune writes one"):
        optimize(models.load("digits-dit"), config=tmp_path / "none.json")
