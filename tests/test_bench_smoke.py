"""Smoke tests of the benchmark harness and bench_sampler on CPU: they run, and write sane JSON.

Speed is never asserted here: only that times are positive and finite, the stamp is present,
and diffrt's sample equals diffusers' to 1e-5 on the same noise.
"""
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffrt.bench import bench_attention, bench_int8, bench_sampler, bench_stream, harness  # noqa: E402

STAMP_KEYS = ("device_type", "python", "torch", "triton", "git_sha", "git_dirty", "source_hash", "cpu_model",
              "cpu_count", "utc")


def _run_quick(out_dir: Path, *extra: str) -> dict:
    code = bench_sampler.main(["--out", str(out_dir), "--device", "cpu", "--quick", "--solvers", "ddim",
                               "--backends", "reference", *extra])
    files = list(out_dir.glob("*.json"))
    assert len(files) == 1, f"expected one JSON in {out_dir}, found {files}"
    assert re.fullmatch(r"cpu-\d{8}-sampler\.json", files[0].name), files[0].name
    document = json.loads(files[0].read_text())
    document["exit_code"] = code
    return document


def test_bench_sampler_quick_writes_stamped_sane_json(tmp_path):
    document = _run_quick(tmp_path)
    assert document["exit_code"] == 0, document.get("notes")
    stamp = document["stamp"]
    for key in STAMP_KEYS:
        assert key in stamp, f"stamp lacks {key}: {sorted(stamp)}"
    assert stamp["device_type"] == "cpu" and "hostname" not in stamp
    rows = document["rows"]
    variants = {(row["variant"], row["backend"]) for row in rows}
    assert variants == {("diffusers", "-"), ("diffrt-eager", "reference")}, variants
    for row in rows:
        assert row["stamp"] == stamp
        assert row["status"] == "ok", row
        assert row["solver"] == "ddim" and row["steps"] == 5 and row["shape"] == "2x4x8x8"
        for key in ("us_per_step", "p20_us", "p80_us", "p99_us", "min_us", "sample_ms", "speedup_vs_diffusers"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert row["min_us"] <= row["p20_us"] <= row["us_per_step"] <= row["p80_us"] <= row["p99_us"]
        assert row["repeats"] >= 3
        assert row["host_syncs_per_step"] is None  # nothing to count on CPU
    ours = next(row for row in rows if row["variant"] == "diffrt-eager")
    assert 0 <= ours["rel_err"] < 1e-5


def test_bench_attention_quick_checks_then_times_every_variant(tmp_path):
    code = bench_attention.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--repeats", "3",
                                 "--warmup", "1"])
    document = json.loads(next(tmp_path.glob("cpu-*-attention.json")).read_text())
    assert code == 0
    rows = document["rows"]
    assert {row["case"] for row in rows} == {case.name for case in bench_attention.QUICK}
    variants = {(row["case"], row["variant"]) for row in rows}
    assert ("tiny-2d", "diffrt-todo2") in variants and ("tiny-2d", "downsample+sdpa") in variants
    assert ("tiny-cross", "diffrt-sparse") not in variants  # no grid ops on cross-attention
    for row in rows:
        assert row["status"] == "ok", row
        assert row["max_rel_error"] < 1e-4 and row["ms"]["median"] > 0 and row["tflops"] > 0
        assert row["ms"]["p20"] <= row["ms"]["median"] <= row["ms"]["p80"]
    sparse = next(row for row in rows if row["variant"] == "diffrt-sparse")
    assert 0 < sparse["density"] < 1


def test_bench_int8_quick_checks_then_times_every_variant(tmp_path):
    code = bench_int8.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--repeats", "3", "--warmup", "1",
                            "--batches", "1,2"])
    document = json.loads(next(tmp_path.glob("cpu-*-int8.json")).read_text())
    assert code == 0
    rows = document["rows"]
    assert len(rows) == len(bench_int8.QUICK) * 2 * 4
    for row in rows:
        assert row["status"] == "ok", row
        assert row["ms"]["median"] > 0 and row["tops"] > 0 and row["speedup_vs_fp16"] > 0
        assert row["max_rel_error"] < (1e-5 if "int8" in row["variant"] or "int_mm" in row["variant"] else 1e-6)


def test_bench_stream_quick_reports_fps_and_latency(tmp_path):
    assert bench_stream.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--frames", "5",
                              "--warmup", "1"]) == 0
    rows = json.loads(next(tmp_path.glob("cpu-*-stream.json")).read_text())["rows"]
    assert [(r["workload"], r["stages"]) for r in rows] == [("sd-turbo-img2img", 1), ("sd-turbo-img2img", 2),
                                                            ("sd-turbo-img2img", 4), ("lipsync", 1)]
    for row in rows:
        assert row["fps"] > 0 and 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
    stages = {r["stages"]: r for r in rows if r["workload"] == "sd-turbo-img2img"}
    assert stages[4]["latency_ms_p50"] > stages[4]["tick_ms_p50"]  # a 4-stage stream holds a frame 4 ticks


def test_bench_sampler_skips_unknown_solver_with_a_note(tmp_path):
    code = bench_sampler.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--solvers", "no-such-solver,ddim",
                               "--backends", "reference", "--repeats", "3"])
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert code == 0
    assert any("no-such-solver" in note for note in document["notes"]), document["notes"]
    assert {row["solver"] for row in document["rows"]} == {"ddim"}


def test_timing_stats_are_ordered_and_scaled():
    timing = harness.Timing([0.004, 0.001, 0.002, 0.003, 0.005])
    stats = timing.stats(scale=1e3)
    assert stats["count"] == 5 and stats["min"] == pytest.approx(1.0) and stats["median"] == pytest.approx(3.0)
    assert stats["min"] <= stats["p20"] <= stats["median"] <= stats["p80"] <= stats["p99"] <= 5.0
    measured = harness.measure(lambda: sum(range(1000)), "cpu", warmup=1, repeats=4)
    assert len(measured.seconds) == 4 and all(s > 0 for s in measured.seconds)


def test_results_are_named_by_device_day_topic_and_never_overwritten(tmp_path):
    stamp = {"device_type": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "utc": "2026-11-24T10:00:00+00:00"}
    first = harness.write_results(tmp_path, "sampler", [{"a": 1}], stamp)
    second = harness.write_results(tmp_path, "sampler", [{"a": 2}], stamp)
    assert first.name == "h100-80gb-hbm3-20261124-sampler.json"
    assert second.name == "h100-80gb-hbm3-20261124-sampler-2.json"
    assert json.loads(first.read_text())["rows"] == [{"a": 1, "stamp": stamp}]


def test_host_sync_counter_is_none_on_cpu_and_passes_other_warnings():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with harness.HostSyncCounter("cpu") as counter, harness.forbid_host_sync("cpu"):
            torch.ones(3).sum().item()
            warnings.warn("unrelated")
    assert counter.count is None
    assert any("unrelated" in str(w.message) for w in seen)


def test_rotating_inputs_cycle_and_l2_flush_is_a_noop_on_cpu():
    made = iter(range(100))
    rotating = harness.RotatingInputs(lambda: next(made), "cpu", count=3)
    assert [rotating.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert len(harness.RotatingInputs(lambda: 0, "cpu", bytes_per_set=1 << 20).sets) == 2
    flush = harness.L2Flush("cpu")
    assert flush.buffer is None
    flush()


def test_format_table_aligns_and_marks_missing_values():
    rows = [{"name": "ddim", "us": 12.3456, "err": 2.2e-7}, {"name": "dpmpp-2m", "us": None, "err": float("nan")}]
    table = harness.format_table(rows, [("solver", lambda r: r["name"]), ("us", lambda r: r["us"]),
                                        ("err", lambda r: r["err"])])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "12.35" in lines[2] and "2.2e-07" in lines[2]
    assert lines[3].split()[1:] == ["-", "nan"]


def test_stamp_is_hostname_free_and_names_the_tree():
    import socket

    stamp = harness.environment_stamp("cpu")
    host = socket.gethostname()
    assert "hostname" not in stamp and (len(host) < 6 or host not in json.dumps(stamp))
    assert re.fullmatch(r"[0-9a-f]{16}", stamp["source_hash"])
    assert harness.device_slug(stamp) == "cpu"


@pytest.mark.gpu
def test_host_sync_counter_counts_item_on_cuda():
    x = torch.ones(4, device="cuda")
    with harness.HostSyncCounter("cuda") as counter:
        x.sum().item()
        x.sum().item()
    assert counter.count == 2
    with pytest.raises(RuntimeError), harness.forbid_host_sync("cuda"):
        x.sum().item()
