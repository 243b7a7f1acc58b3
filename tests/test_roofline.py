"""The roofline estimate's arithmetic and the static profile's rendering (no compile, no GPU)."""
import math

from diffrt.bench import roofline, static_profile
from diffrt.kernels.compile_variants import SHAPES_BY_CASE


def _row(**overrides) -> dict:
    row = {"name": "attention/sdxl-1024-l1/float16", "kernel": "attention", "family": "sdxl", "case": "sdxl-1024-l1",
           "dtype": "float16", "call": {"head_dim": 64}, "arch": 90, "grid": [32, 20], "registers": 119,
           "num_warps": 8, "shared_bytes": 65536, "shared_limit": 232448, "shared_fits": True, "stack_bytes": 0,
           "wgmma": 8, "mma": 0, "cp_async": 12, "cp_async_bytes": {"16": 12}, "tma_loads": 0,
           "global_loads": {"16": 4}, "loop_sync_loads": {}, "stages": 3, "loop_instructions": 387}
    return {**row, **overrides}


def test_attention_work_counts_both_products_and_the_compulsory_traffic():
    shape = SHAPES_BY_CASE["sdxl-1024-l1"]  # 2 x 10 heads x 4096 tokens x 64
    flops, nbytes = roofline.attention_work(shape)
    assert flops == 2 * (2 * 20 * 4096 * 4096 * 64)  # q k^T and p v, 2 flops per multiply-add
    assert nbytes == 2 * 20 * 64 * 4 * 4096  # q, k, v, o in fp16
    todo_flops, todo_bytes = roofline.attention_work(shape, 1 / 4)
    assert todo_flops == flops / 4 and todo_bytes == 2 * 20 * 64 * (2 * 4096 + 2 * 1024)
    cross_flops, _ = roofline.attention_work(SHAPES_BY_CASE["sd15-512-cross"])
    assert cross_flops == 4 * 16 * 4096 * 77 * 40


def test_occupancy_and_wave_fill_of_a_profiled_launch():
    row = _row()
    # registers: 119 x 32 rounded to 3840 per warp x 8 warps -> 2 CTAs; shared: 233472 // (65536 + 1024) = 3
    assert roofline.ctas_per_sm(row) == 2
    assert math.isclose(roofline.wave_fill(row), 640 / (3 * 264))
    assert roofline.ctas_per_sm(_row(shared_bytes=200000)) == 1
    assert roofline.wave_fill(_row(grid=None)) is None


def test_estimate_is_labelled_and_sums_layers_per_family():
    estimates = roofline.estimate([_row()])
    assert "ESTIMATE" in estimates["label"]
    sdxl = next(f for f in estimates["families"] if f["family"] == "sdxl")
    dense = [layer for layer in estimates["layers"] if layer["family"] == "sdxl" and layer["mode"] == "dense"]
    assert sdxl["attention_calls"] == 80
    assert math.isclose(sdxl["attention_gflop"], sum(layer["gflop"] * layer["layers"] for layer in dense))
    assert sdxl["attention_estimate_ms"] is None  # only one of its three layers was profiled
    layer = next(layer for layer in dense if layer["case"] == "sdxl-1024-l1")
    assert math.isclose(layer["estimate_ms"], layer["roofline_ms"] / roofline.wave_fill(_row()))
    step = sdxl["solver_step"]  # [4, 128, 128] fp32: x, cond, uncond, one history slot read; x and the slot written
    assert step["mbytes"] == 4 * 4 * 128 * 128 * 6 / 1e6
    text = roofline.markdown(estimates)
    assert text.count("ESTIMATE") >= 1 and "(estimate)" in text


def test_measured_beside_takes_diffrt_and_the_best_sdpa_backend():
    estimates = roofline.estimate([_row()])
    rows = [{"case": "sdxl-1024-l1", "variant": "sdpa-flash", "status": "ok", "ms": {"median": 0.30}},
            {"case": "sdxl-1024-l1", "variant": "sdpa-cudnn", "status": "ok", "ms": {"median": 0.25}},
            {"case": "sdxl-1024-l1", "variant": "diffrt-dense", "status": "ok", "ms": {"median": 0.40}},
            {"case": "sdxl-1024-l1", "variant": "sdpa-efficient", "status": "not measured: error"}]
    measured = {row["case"]: row for row in roofline.measured_beside(estimates, rows)}
    assert (measured["sdxl-1024-l1"]["diffrt_ms"], measured["sdxl-1024-l1"]["sdpa_best_ms"]) == (0.40, 0.25)
    assert measured["dit-xl-256"]["diffrt_ms"] is None
    assert "SDPA best measured ms" in roofline.markdown(estimates, list(measured.values()))


def test_the_readme_table_folds_identical_bf16_rows_and_flags_shared_memory():
    twin = _row(name="attention/sdxl-1024-l1/bfloat16", dtype="bfloat16")
    over = _row(name="attention/sweep-hd256/float32", case="sweep-hd256", dtype="float32", call={"head_dim": 256},
                shared_bytes=368896, shared_fits=False)
    text = static_profile.table({"rows": [_row(), twin, over], "failures": []})
    lines = [line for line in text.splitlines() if line.startswith("| sdxl") or line.startswith("| sweep")]
    assert len(lines) == 2 and "float16 / bfloat16" in lines[0]
    assert "360.2 / 227 **over**" in lines[1]


def test_the_readme_section_is_rendered_from_the_recorded_profiles():
    date = static_profile.latest_date()
    assert date is not None, "no bench/results/static-sm90-<date>-kernels.json"
    _, estimate_md, section = static_profile.build(date, "", (90, 80))
    assert section in static_profile.README.read_text(), "run python -m diffrt.bench.static_profile --render-only"
    recorded = (static_profile.RESULTS / f"static-sm90-{date}-roofline-estimate.md").read_text()
    assert recorded == estimate_md
