"""``diffrt bench`` on CPU: the command runs the baselines and diffrt's configurations, writes JSON that
meets its schema, a chart and a table, and refuses bad input with a message. Nothing is timed here:
only that the recorded times are sane (positive, ordered) and the quality columns say what they should."""
import json
import math

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("diffusers")

from diffrt.bench import benchmark, zoo  # noqa: E402
from diffrt.bench.report import SCHEMA  # noqa: E402
from diffrt.runtime import cli  # noqa: E402

CONFIGS = "diffusers-eager,streamdiffusion,exact,graphs,int8,adaptive-guidance,early-exit,step-cache,combined"


def _bench(tmp_path, capsys, *extra: str) -> tuple[int, dict, str]:
    code = cli.main(["bench", "--batch", "2", "--steps", "3", "--warmup", "0", "--repeats", "2", "--quiet",
                     "--out", str(tmp_path), *extra])
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    return code, json.loads(files[0].read_text()), capsys.readouterr().out


def test_bench_digits_dit_rows_schema_chart_and_table(tmp_path, capsys):
    code, document, out = _bench(tmp_path, capsys, "--model", "digits-dit", "--configs", CONFIGS)
    assert code == 0, out
    jsonschema.validate(document, SCHEMA)
    rows = {row["config"]: row for row in document["rows"]}
    assert list(rows) == CONFIGS.split(",")
    assert rows["graphs"]["status"] == "skipped" and "CUDA" in rows["graphs"]["note"]
    assert rows["streamdiffusion"]["status"] == "skipped" and "streamdiffusion" in rows["streamdiffusion"]["note"]
    for name in ("diffusers-eager", "exact", "int8", "adaptive-guidance", "early-exit", "step-cache", "combined"):
        row = rows[name]
        assert row["status"] == "ok", row
        ms = row["latency_ms"]
        assert 0 < ms["min"] <= ms["median"] <= ms["p90"] <= ms["p99"]
        assert math.isclose(row["throughput_per_s"], 2 / (ms["median"] / 1e3))
        assert row["speedup"]["diffusers-eager"] > 0
        assert row["peak_memory_mib"] is None  # CPU: no GPU memory to report
    assert math.isclose(rows["diffusers-eager"]["speedup"]["diffusers-eager"], 1.0)
    # fp32 on CPU: the eager baseline *is* the reference loop, diffrt's exact path reproduces it
    assert rows["diffusers-eager"]["psnr_db"] > 200 and rows["exact"]["psnr_db"] > 100 and rows["exact"]["exact"]
    for name in ("int8", "adaptive-guidance", "early-exit", "combined"):  # approximations: a finite, lower PSNR
        assert not rows[name]["exact"] and 10 < rows[name]["psnr_db"] < rows["exact"]["psnr_db"], (name, rows[name])
    assert rows["combined"]["acceleration_config"]["early_exit"] is not None  # the DiT has exit heads
    assert document["settings"]["steps"] == 3 and document["settings"]["batch"] == 2
    assert document["workload"]["model"] == "digits-dit"
    png = sorted(tmp_path.glob("*.png"))
    assert len(png) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("diffusers-eager", "early-exit", "p50 ms", "x eager", "PSNR dB"):
        assert name in out


def test_bench_unet_skips_what_does_not_apply_and_runs_a_tuned_config(tmp_path, capsys):
    from diffrt.runtime.acceleration import Acceleration

    tuned = Acceleration(steps=2, adaptive_guidance=0.9).save(tmp_path / "cfg" / "tuned.json")
    code, document, out = _bench(tmp_path, capsys, "--model", "digits-unet", "--no-chart", "--configs",
                                 "diffusers-eager,early-exit,step-cache,todo", "--config", str(tuned))
    assert code == 0, out
    jsonschema.validate(document, SCHEMA)
    rows = {row["config"]: row for row in document["rows"]}
    assert rows["early-exit"]["status"] == "skipped" and "exit heads" in rows["early-exit"]["note"]
    assert rows["step-cache"]["status"] == "skipped" and "UNet2DModel" in rows["step-cache"]["note"]
    assert rows["todo"]["status"] == "ok" and rows["todo"]["psnr_db"] < 100  # ToDo changes the samples
    assert rows["tuned"]["status"] == "ok" and rows["tuned"]["acceleration_config"]["steps"] == 2
    assert rows["tuned"]["psnr_db"] < rows["diffusers-eager"]["psnr_db"]  # 2 steps against the 3-step reference
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name", ["sd15-unet", "sdxl-unet", "dit-xl-2", "flux-like", "sd-turbo-stream", "lipsync"])
def test_every_architecture_runs_tiny_and_its_exact_row_matches_the_diffusers_loop(name):
    workload = zoo.workload(name, tiny=True)
    steps = 1 if workload.steps == 1 else 2
    result = benchmark.run(workload, batch=2, steps=steps, configs=["diffusers-eager", "exact", "int8"], warmup=0,
                           repeats=1, progress=False)
    rows = {row["config"]: row for row in result["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["exact"]["psnr_db"] > 100  # fp32: the same grid, the same maths as diffusers' loop
    assert 20 < rows["int8"]["psnr_db"] < rows["exact"]["psnr_db"]


def test_bad_input_is_refused_with_a_message(tmp_path, caplog):
    def bench(*args):
        return cli.main(["bench", "--out", str(tmp_path), "--quiet", *args])

    assert bench("--model", "no-such-model") == 2
    assert "unknown model 'no-such-model'" in caplog.text
    assert bench("--model", "digits-dit", "--resolution", "32") == 2
    assert "16x16" in caplog.text
    assert bench("--model", "digits-dit", "--configs", "exact,warp-speed") == 2
    assert "unknown configuration(s) warp-speed" in caplog.text
    assert bench("--model", "digits-dit", "--config", str(tmp_path / "missing.json")) == 2
    assert "no acceleration config" in caplog.text
    assert bench("--model", "sd15-unet", "--tiny", "--resolution", "60") == 2
    assert "multiple of 8" in caplog.text
    if not torch.cuda.is_available():
        assert bench("--model", "digits-dit", "--device", "cuda") == 2
        assert "torch sees no CUDA device" in caplog.text
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


def test_readme_performance_table_is_generated_from_the_recorded_results():
    """README.md's table is exactly what bench/publish.py renders from bench/results (never typed by hand)."""
    from pathlib import Path

    from diffrt.bench import publish

    root = Path(__file__).resolve().parent.parent

    text = (root / "README.md").read_text()
    assert publish.replace_section(text, publish.render()) == text, "run python -m diffrt.bench.publish"
    for path in sorted((root / "bench" / "results").glob("*-bench-*.json")):  # what is published meets the schema
        jsonschema.validate(json.loads(path.read_text()), SCHEMA)


def test_bench_takes_a_diffusers_model_folder(tmp_path, capsys):
    from diffusers import DDPMScheduler

    folder = tmp_path / "unet"
    cli._tiny_unet(channels=1, size=8, seed=0).save_pretrained(folder)
    DDPMScheduler(prediction_type="epsilon").save_config(folder)
    out = tmp_path / "out"
    code = cli.main(["bench", "--model", str(folder), "--batch", "2", "--steps", "2", "--warmup", "0", "--repeats", "1",
                     "--configs", "diffusers-eager,exact,int8", "--quiet", "--no-chart", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    document = json.loads(next(out.glob("*-bench-unet.json")).read_text())
    jsonschema.validate(document, SCHEMA)
    rows = {row["config"]: row for row in document["rows"]}
    assert document["workload"]["sample_shape"] == [1, 8, 8]
    assert rows["exact"]["psnr_db"] > 100 and rows["int8"]["status"] == "ok"


@pytest.mark.parametrize("name", ["sd15-unet", "flux-like"])
def test_bench_pipeline_mode_times_the_real_pipeline_class(name, tmp_path, capsys):
    pytest.importorskip("transformers")  # diffusers' pipeline classes need it
    code, document, out = _bench(tmp_path, capsys, "--model", name, "--tiny", "--pipeline", "--no-chart",
                                 "--configs", "diffusers-eager,exact")
    assert code == 0, out
    jsonschema.validate(document, SCHEMA)
    assert document["settings"]["mode"] == "pipeline" and document["workload"]["model"] == f"{name}-pipeline"
    rows = {row["config"]: row for row in document["rows"]}
    assert list(rows) == ["diffusers-eager", "exact"]
    assert rows["exact"]["status"] == "ok" and rows["exact"]["psnr_db"] > 100  # accelerate(pipe) is exact
    assert "Pipeline" in document["workload"]["description"]


def test_bench_pipeline_mode_refuses_a_model_without_a_pipeline_class(tmp_path, caplog):
    assert cli.main(["bench", "--model", "digits-dit", "--pipeline", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no diffusers pipeline class" in caplog.text
