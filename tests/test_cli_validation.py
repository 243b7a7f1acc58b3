"""Every ``diffrt`` sub-command validates its options before working: a bad value ends with exit code 2
and one line on stderr, never a traceback; an expected error raised by the work is one log line and
exit code 2; ``None`` defaults are not confused with 0. ``diffrt bench`` flags a row whose spread shows
it was not warm. Nothing here is timed: the bench tests use synthetic rows and call counts."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffrt.bench import benchmark, harness, zoo
from diffrt.bench import cli as bench_cli
from diffrt.runtime import cli

ROOT = Path(__file__).resolve().parent.parent

# (sub-command and its required arguments, option, bad values): every numeric / device / choice option
BAD_OPTIONS = [
    (["sample"], "--steps", ["0", "-1", "three", "2.5", "10001"]),
    (["sample"], "--batch", ["0", "-3"]),
    (["sample"], "--channels", ["0"]),
    (["sample"], "--resolution", ["7", "0", "-2"]),
    (["sample"], "--eta", ["-0.1", "nan"]),
    (["sample"], "--seed", ["-1"]),
    (["sample"], "--tolerance", ["-1", "inf"]),
    (["sample"], "--device", ["bogus", "cuda:x", "cuda:-1"]),
    (["sample"], "--backend", ["bogus"]),
    (["demo"], "--rows", ["-1", "0"]),
    (["demo"], "--reference-steps", ["0", "20000"]),
    (["demo"], "--fast-steps", ["0", "20000"]),
    (["demo"], "--guidance-scale", ["-1", "nan"]),
    (["demo"], "--seed", ["-1"]),
    (["demo"], "--device", ["bogus"]),
    (["export", "onnx", "--model", "digits-dit"], "--batch", ["0", "-1"]),
    (["export", "onnx", "--model", "digits-dit"], "--resolution", ["7", "0x64", "64x", "axb"]),
    (["export", "tensorrt", "--model", "digits-dit"], "--precision", ["int4"]),
    (["bench", "--model", "digits-dit"], "--batch", ["0"]),
    (["bench", "--model", "digits-dit"], "--warmup", ["-1"]),
    (["bench", "--model", "digits-dit"], "--repeats", ["0", "-2"]),
    (["bench", "--model", "digits-dit"], "--max-seconds", ["0", "-1", "nan"]),
    (["bench", "--model", "digits-dit"], "--compile-mode", ["fastest"]),
    (["bench", "--model", "digits-dit"], "--dtype", ["fp8"]),
    (["tune", "--model", "digits-dit"], "--batch", ["0"]),
    (["tune", "--model", "digits-dit"], "--repeats", ["0"]),
    (["tune", "--model", "digits-dit"], "--quality-floor", ["nan", "inf"]),
    (["serve"], "--port", ["0", "70000", "-1", "http"]),
    (["serve"], "--max-batch", ["0"]),
    (["serve"], "--max-wait-ms", ["-1", "nan"]),
    (["serve"], "--max-queue", ["0"]),
    (["serve"], "--max-streams", ["-1"]),
    (["serve"], "--max-body-bytes", ["0", "-1", "1e6", "8MB"]),
    (["serve"], "--stream-idle-timeout-s", ["0", "-1", "nan", "inf", "soon"]),
    (["serve"], "--threads", ["-1", "0"]),
    (["serve"], "--device", ["bogus", "gpu"]),
    (["serve"], "--models", [",", " "]),
    (["serve"], "--acceleration", ["fast", "=x.json", "name="]),
]
for _command in ("bench", "tune"):  # the workload options both share
    BAD_OPTIONS += [([_command, "--model", "digits-dit"], option, values) for option, values in (
        ("--resolution", ["0", "-16"]), ("--steps", ["0", "-1", "20000"]), ("--seed", ["-1"]), ("--threads", ["-1", "0"]),
        ("--device", ["bogus", "tpu"]), ("--solver", ["warp"]))]
CASES = [pytest.param(command, option, value, id=f"{command[0]} {option} {value}")
         for command, option, values in BAD_OPTIONS for value in values]


def _refused(capsys, argv: list[str]) -> str:
    """Run ``diffrt argv``, expect argparse's refusal; returns the one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


@pytest.mark.parametrize("command, option, value", CASES)
def test_a_bad_option_value_ends_with_exit_2_and_one_line(capsys, command, option, value):
    line = _refused(capsys, [*command, f"{option}={value}"])
    assert line.startswith(f"diffrt {command[0]}: error: argument {option}"), line


def test_the_messages_say_what_is_accepted(capsys):
    assert "cpu, cuda or cuda:N" in _refused(capsys, ["sample", "--device", "bogus"])
    assert "1..65535" in _refused(capsys, ["serve", "--port", "70000"])
    assert ">= 1" in _refused(capsys, ["bench", "--model", "digits-dit", "--repeats", "0"])
    assert "even" in _refused(capsys, ["sample", "--resolution", "7"])
    assert "in 1..10000" in _refused(capsys, ["bench", "--model", "digits-dit", "--steps", "20000"])
    assert "NAME=PATH" in _refused(capsys, ["serve", "--acceleration", "fast"])
    long_value = "9" * 5000
    assert len(_refused(capsys, ["sample", "--steps", long_value + "x"])) < 400  # a huge value is not echoed whole


def test_serve_passes_its_limits_to_the_server(monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    serve = pytest.importorskip("diffrt.serve")
    configs, options = [], []
    monkeypatch.setattr(serve, "create_app", configs.append)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: options.append(kw))
    assert cli.main(["serve", "--models", "digits-dit", "--max-body-bytes", "4096", "--stream-idle-timeout-s", "2.5",
                     "--port", "8123"]) == 0
    assert (configs[0].max_body_bytes, configs[0].stream_idle_timeout_s, options[0]["port"]) == (4096, 2.5, 8123)
    assert cli.main(["serve", "--models", "digits-dit"]) == 0  # the defaults are the server's own
    defaults = serve.ServeConfig()
    assert (configs[1].max_body_bytes, configs[1].stream_idle_timeout_s) == (defaults.max_body_bytes,
                                                                             defaults.stream_idle_timeout_s)


def test_missing_arguments_and_commands_are_one_line_too(capsys):
    assert "required" in _refused(capsys, [])
    assert "--model" in _refused(capsys, ["bench"])
    assert "invalid choice" in _refused(capsys, ["frobnicate"])


@pytest.mark.parametrize("command", [["demo"], ["bench", "--model", "digits-dit"]])
def test_an_out_folder_that_is_a_file_is_refused(tmp_path, capsys, command):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert "is a file, not a folder" in _refused(capsys, [*command, "--out", str(afile)])
    assert "is a file, not a folder" in _refused(capsys, [*command, "--out", str(afile / "below")])


def test_a_tune_out_that_is_a_folder_is_refused(tmp_path, capsys):
    assert "is a folder, not a file" in _refused(capsys, ["tune", "--model", "digits-dit", "--out", str(tmp_path)])


@pytest.mark.parametrize("command", [["demo"], ["bench", "--model", "digits-dit"]])
def test_a_read_only_out_folder_is_refused(tmp_path, capsys, monkeypatch, command):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    real_access = os.access
    if real_access(folder, os.W_OK):  # root writes anywhere: make the check see a read-only folder
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (Path(path) == folder and mode & os.W_OK)
                            and real_access(path, mode, **kw))
    try:
        assert "is not writable" in _refused(capsys, [*command, "--out", str(folder)])
        assert "is not writable" in _refused(capsys, [*command, "--out", str(folder / "new")])
    finally:
        folder.chmod(0o700)


def test_output_problem_accepts_what_can_be_written(tmp_path):
    assert bench_cli.output_problem(tmp_path, folder=True) is None
    assert bench_cli.output_problem(tmp_path / "new" / "deeper", folder=True) is None
    assert bench_cli.output_problem(tmp_path / "new.json", folder=False) is None
    assert bench_cli.device("CUDA:1") == "cuda:1" and bench_cli.device("cpu") == "cpu"


def test_export_out_of_the_wrong_kind_is_one_log_line(tmp_path, caplog):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert cli.main(["export", "tensorrt", "--model", "digits-dit", "--out", str(afile)]) == 2
    assert "is a file, not a folder" in caplog.text
    assert cli.main(["export", "onnx", "--model", "digits-dit", "--out", str(tmp_path)]) == 2
    assert "is a folder, not a file" in caplog.text


def test_export_onnx_refuses_batch_0_itself():
    from diffrt.export import export_onnx

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            export_onnx(None, "never-written.onnx", batch=bad)
    assert not Path("never-written.onnx").exists()


@pytest.mark.parametrize("option, values, message", [
    ("resolution", [0, -16, (0, 16), (16,), "16x16", (16.0, 16), (True, 16)], "resolution must be (height, width)"),
    ("opset", [0, -1, "17", 17.0, True], "opset must be a positive integer"),
])
def test_export_onnx_refuses_bad_shapes_and_opsets_itself(option, values, message):
    from diffrt.export import export_onnx

    for bad in values:
        with pytest.raises(ValueError, match=re.escape(message)):
            export_onnx(None, "never-written.onnx", **{option: bad})
    assert not Path("never-written.onnx").exists()


@pytest.mark.parametrize("error", [ValueError, TypeError, NotImplementedError, FileNotFoundError, PermissionError,
                                   OSError, ImportError])
def test_an_expected_error_in_a_command_is_one_log_line_and_exit_2(monkeypatch, caplog, capsys, error):
    def fail(args):
        raise error("first line\nsecond line " + repr(list(range(10**5))))

    monkeypatch.setattr(cli, "cmd_demo", fail)
    assert cli.main(["demo"]) == 2
    records = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message and message.startswith("first line second line [0, 1") and len(message) <= 300
    assert "Traceback" not in capsys.readouterr().err


def test_a_runtime_error_is_one_stderr_line_from_the_command_line(tmp_path):
    """The real entry point, logging as configured by main(): one line on stderr, exit code 2."""
    argv = [sys.executable, "-m", "diffrt.runtime.cli", "bench", "--model", "no-such-model", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0], done.stderr


def test_sample_honours_steps_3(capsys):
    code = cli.main(["sample", "--steps", "3", "--batch", "1", "--channels", "1", "--resolution", "4",
                     "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "steps=3" in out
    assert [line.split()[0] for line in out.splitlines() if line[:4].strip().isdigit()] == ["0", "1", "2"]


def test_bench_and_tune_honour_steps_3(monkeypatch, tmp_path, capsys):
    """``--steps 3`` reaches the benchmark and the tuner (not replaced by the model's default)."""
    from diffrt.bench import tune

    seen = {}

    def fake_run(workload, **options):
        seen["bench"] = options["steps"]
        row = {"config": "exact", "kind": "diffrt", "status": "skipped", "note": "not run in this test"}
        settings = {"batch": 1, "solver": "dpmpp-2m", "steps": options["steps"], "dtype": "float32", "device": "cpu",
                    "guidance_scale": None, "reference": "nothing"}
        return {"rows": [row], "workload": workload.summary(), "settings": settings}

    def fake_tune(workload, *args, **options):
        seen["tune"] = workload.steps
        raise ValueError("stop here")

    monkeypatch.setattr(benchmark, "run", fake_run)
    monkeypatch.setattr(tune, "tune", fake_tune)
    assert cli.main(["bench", "--model", "digits-dit", "--steps", "3", "--no-chart", "--quiet", "--out",
                     str(tmp_path)]) == 0
    assert cli.main(["tune", "--model", "digits-dit", "--steps", "3", "--quiet", "--out",
                     str(tmp_path / "t.json")]) == 2
    assert seen == {"bench": 3, "tune": 3}
    capsys.readouterr()


def test_library_entry_points_refuse_zero_counts():
    with pytest.raises(ValueError, match="repeats=0"):
        benchmark.run(None, repeats=0)  # refused before the workload is touched
    with pytest.raises(ValueError, match="steps=0"):
        benchmark.run(None, steps=0)
    with pytest.raises(ValueError, match="batch=0"):
        benchmark.run(None, batch=0)
    with pytest.raises(ValueError, match="repeats"):
        harness.measure(lambda: None, "cpu", warmup=0, repeats=0)
    with pytest.raises(ValueError, match="repeats"):
        benchmark.time_rows([({"config": "x"}, lambda: None)], torch.device("cpu"), 1, 0, None)
    with pytest.raises(ValueError, match="resolution 0"):
        zoo._latent(0, 512)  # 0 is not "the default"


# ----------------------------------------------------------------------------- bench: warm-up and spread

def test_spread_note_flags_p99_far_above_p50():
    assert harness.spread_note({"median": 688.99, "p99": 53241.25}) is not None  # the published compile row
    assert "not warmed up" in harness.spread_note({"median": 10.0, "p99": 100.1})
    assert harness.spread_note({"median": 10.0, "p99": 100.0}) is None  # exactly 10x: still accepted
    assert harness.spread_note({"median": 678.7, "p99": 768.5}) is None
    assert harness.spread_note({"median": 10.0, "p99": 30.0}, limit=2.0) is not None
    assert "not a valid timing" in harness.spread_note({"median": math.nan, "p99": math.nan})
    assert "not a valid timing" in harness.spread_note({})


def _timed_row(name: str, median: float, p99: float, kind: str = "baseline", **extra) -> dict:
    latency = {"median": median, "p90": (median + p99) / 2, "p99": p99, "p20": median, "p80": median, "min": median,
               "mean": median}
    return {"config": name, "kind": kind, "status": "ok", "latency_ms": latency, "repeats": 10,
            "throughput_per_s": 1e3 / median, "setup_s": 0.1, "first_call_s": 1.0, **extra}


def test_flag_spread_marks_only_cold_ok_rows():
    cold, warm = _timed_row("diffusers-compile", 689.0, 53241.0), _timed_row("diffusers-eager", 679.0, 768.0)
    failed = {**_timed_row("exact", 10.0, 500.0, kind="diffrt"), "status": "quality-fail", "note": "low PSNR"}
    for row in (cold, warm, failed):
        benchmark.flag_spread(row)
    assert cold["status"] == "unstable" and "p99" in cold["note"] and "not warmed up" in cold["note"]
    assert warm["status"] == "ok" and "note" not in warm
    assert failed["status"] == "quality-fail" and failed["note"] == "low PSNR"


def test_unstable_rows_keep_speedups_and_meet_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from diffrt.bench.report import SCHEMA, table

    rows = [_timed_row("diffusers-eager", 679.0, 768.0, psnr_db=300.0),
            _timed_row("diffusers-compile", 689.0, 53241.0, psnr_db=300.0),
            _timed_row("exact", 700.0, 760.0, kind="diffrt", exact=True, psnr_db=150.0)]
    for row in rows:
        benchmark.flag_spread(row)
    benchmark._speedups(rows)
    assert [r["status"] for r in rows] == ["ok", "unstable", "ok"]
    assert rows[2]["speedup"].keys() == {"diffusers-eager", "diffusers-compile"}
    assert rows[1]["speedup"]["diffusers-compile"] == 1.0
    stamp = {"device_type": "cpu", "torch": "x", "triton": None, "git_sha": None, "source_hash": "x", "utc": "x"}
    result = {"topic": "bench-x", "stamp": stamp, "rows": [{**r, "stamp": stamp} for r in rows],
              "workload": {"model": "x", "sample_shape": [1], "solver": "s", "steps": 3, "description": "d"},
              "settings": {"batch": 1, "solver": "s", "steps": 3, "dtype": "float32", "device": "cpu",
                           "guidance_scale": None, "reference": "r"}}
    jsonschema.validate(result, SCHEMA)
    assert "unstable" in table(result) and "not warmed up" in table(result)
    bad = {**result, "rows": [{**result["rows"][1], "note": None}]}
    del bad["rows"][0]["note"]
    with pytest.raises(jsonschema.ValidationError):  # an unstable row says why
        jsonschema.validate(bad, SCHEMA)


def test_the_published_digits_unet_compile_row_would_be_flagged():
    document = json.loads((ROOT / "bench" / "results" / "cpu-20261202-bench-digits-unet.json").read_text())
    flagged = [r["config"] for r in document["rows"] if "latency_ms" in r and harness.spread_note(r["latency_ms"])]
    assert flagged == ["diffusers-compile"]


def test_time_rows_warms_every_row_after_all_are_built_before_timing():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def call():
            calls[name] += 1
            return torch.zeros(1)
        return call

    rows = [{"config": name, "status": "ok"} for name in calls]
    benchmark.time_rows([(row, counter(row["config"])) for row in rows], torch.device("cpu"), batch=1, repeats=2,
                        max_seconds=None, warmup=1)
    assert calls == {"a": 3, "b": 3}  # one untimed round, then two timed ones
    assert all(row["repeats"] == 2 and row["latency_ms"]["median"] > 0 for row in rows)


def test_the_compile_baseline_compiles_its_own_model_copy():
    workload = zoo.workload("digits-unet")
    shared = benchmark._model_copy(workload.den, torch.float32)
    wrapped = benchmark._model_copy(workload.den, torch.float32, lambda model: model)
    assert shared.model is workload.den.model  # eager: the same weights
    assert wrapped.model is not workload.den.model  # compile: diffrt's installed layers cannot reach it
