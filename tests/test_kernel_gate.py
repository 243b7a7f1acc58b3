"""The CI gate on what the compiler makes of diffrt's Triton kernels for sm_90 (H100 / H200) and sm_80 (A100).

``python -m diffrt.kernels.compile_check --quick`` compiles the gate's variants as Triton's JIT does
for real calls (fp16 / bf16 attention at every head dim real models use, ToDo and block-sparse at
some, the head-dim-256 extremes, the INT8 GEMM's input kinds), once for this module, in a
subprocess with TRITON_INTERPRET unset. Each test states one requirement and lists every variant
that misses it:

* every variant compiles at the tile the untuned path runs, and that tile is launchable: its
  shared memory fits the arch's per-block limit and its registers fit a block;
* no stack frame or spill for fp16 / bf16 attention at head dims <= 160, nor for the INT8 GEMM;
* K / V (and the GEMM's operand) loads are asynchronous and pipelined (>= 2 stages) for fp16 / bf16
  at head dims 40, 64, 72, 80, 96, 128, 160 and for the INT8 GEMM: the main loop's loads are
  cp.async / TMA copies issued ahead of the math (a block-sparse loop may also read its int32
  block index);
* tensor cores do the matrix products: wgmma on sm_90, mma on sm_80, inside the main loop
  (fp32 attention computes in IEEE fp32 by design and is not held to this).
"""
import json
import os
import subprocess
import sys

import pytest
from diffrt.kernels.compile_variants import GATE_HEAD_DIMS

ARCHS = (90, 80)
THREAD_REGISTERS = 65536  # registers of one SM's register file: a block's threads x registers must fit


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    folder = tmp_path_factory.mktemp("kernel-gate")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(folder / "triton-cache"))
    out = folder / "profile.json"
    done = subprocess.run([sys.executable, "-m", "diffrt.kernels.compile_check", "--quick", "--arch",
                           ",".join(map(str, ARCHS)), "--out", str(out)], check=False, capture_output=True,
                          text=True, env=env, timeout=1200)
    assert out.exists(), done.stderr[-3000:]
    return json.loads(out.read_text())


def _low_precision(row: dict) -> bool:
    return row["dtype"] in ("float16", "bfloat16")


def _misses(rows: list[dict], keep, problem) -> list[str]:
    """``sm_<arch> <variant>: <problem>`` for each row that ``keep`` selects and ``problem`` finds fault with."""
    return [f"sm_{row['arch']} {row['name']}: {problem(row)}" for row in rows if keep(row) and problem(row)]


def _report(misses: list[str]) -> str:
    return f"{len(misses)} variant(s):\n" + "\n".join(misses)


def test_the_gate_covers_every_real_head_dim_and_both_archs(profile):
    seen = {(row["arch"], row["dtype"], row["call"].get("head_dim")) for row in profile["rows"] + profile["failures"]
            if row["kernel"] == "attention"}
    wanted = {(arch, dtype, dim) for arch in ARCHS for dtype in ("float16", "bfloat16") for dim in GATE_HEAD_DIMS}
    assert wanted <= seen, sorted(wanted - seen)
    assert {row["arch"] for row in profile["rows"] if row["kernel"] == "int8"} == set(ARCHS)


def test_every_variant_compiles_at_its_heuristic_tile(profile):
    assert not profile["failures"], _report([f"sm_{row['arch']} {row['name']}: {row['error'][:300]}"
                                             for row in profile["failures"]])


def test_the_heuristic_tile_is_launchable(profile):
    def problem(row):
        if not row["shared_fits"]:
            return f"shared memory {row['shared_bytes']} B > the sm_{row['arch']} block limit {row['shared_limit']} B"
        if row["registers"] * row["num_warps"] * 32 > THREAD_REGISTERS:
            return f"{row['registers']} registers x {row['num_warps']} warps exceed the register file"
        return None

    misses = _misses(profile["rows"], lambda row: True, problem)
    assert not misses, _report(misses)


def test_no_stack_or_spills_for_fp16_bf16_up_to_head_dim_160(profile):
    def keep(row):
        return row["kernel"] == "int8" or (_low_precision(row) and row["call"]["head_dim"] <= 160)

    def problem(row):
        if row["stack_bytes"] or row["local_bytes"] or row["spill_instructions"]:
            return (f"stack {row['stack_bytes']} B, local {row['local_bytes']} B, {row['spill_instructions']} spill "
                    f"instructions ({row['registers']} registers)")
        return None

    misses = _misses(profile["rows"], keep, problem)
    assert not misses, _report(misses)


def _loads_problem(row: dict) -> str | None:
    allowed = {"4": 1} if row["call"].get("sparse") else {}  # a block-sparse loop reads its int32 block index
    loads = row["loop_sync_loads"]
    extra = {width: count for width, count in loads.items() if count > allowed.get(width, 0)}
    if not row["pipelined"] or row["stages"] < 2:
        return (f"loads not pipelined: {row['cp_async']} cp.async, {row['tma_loads']} TMA, {row['loop_async_copies']} "
                f"async copies in the loop, num_stages {row['num_stages']}; synchronous loads {row['global_loads']}")
    if extra:
        return f"synchronous global loads in the main loop {{bytes: count}}: {loads}"
    return None


def test_kv_and_gemm_operand_loads_are_asynchronous_and_pipelined(profile):
    def keep(row):
        return row["kernel"] == "int8" or (_low_precision(row) and row["call"]["head_dim"] in GATE_HEAD_DIMS)

    misses = _misses(profile["rows"], keep, _loads_problem)
    assert not misses, _report(misses)


def test_tensor_cores_do_the_matrix_products(profile):
    def problem(row):
        instruction = "wgmma" if row["arch"] >= 90 else "mma"
        if row[instruction] == 0 or row["loop_mma"] == 0:
            return (f"{row[instruction]} {instruction} in the PTX, {row['loop_mma']} tensor-core instructions in the "
                    "main loop")
        return None

    misses = _misses(profile["rows"], lambda row: row["kernel"] == "int8" or _low_precision(row), problem)
    assert not misses, _report(misses)
