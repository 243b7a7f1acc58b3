"""compile_check compiles diffrt's Triton kernels for sm_90 / sm_80 as the JIT does for a real call, on this
GPU-less machine, and reads the right numbers out of the PTX and SASS.

The compiling tests run in a subprocess with TRITON_INTERPRET unset (the test session interprets
Triton); the parsers are tested on hand-written PTX / SASS.
"""
import json
import os
import subprocess
import sys

import pytest
from diffrt.kernels import compile_check, kernel_metrics
from diffrt.kernels.compile_variants import ATTENTION_SHAPES, GATE_HEAD_DIMS, Variant, attention_variants

PTX = """
	ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
	ld.global.b16 { %rs2 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r51 + 0 ], [ %rd11 + 0 ], 0x10, %r54;
	cp.async.ca.shared.global [ %r52 + 0 ], [ %rd12 + 0 ], 8, %r56;
	cp.async.commit_group;
	cp.async.wait_group 	2;
	cp.async.wait_group 	0;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd4, %rd5, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f2}, %rd6, %rd7, p, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f3}, {%r5}, {%r6}, {%f4};
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r7], [%rd8, {%r8, %r9}], [%r10];
	mbarrier.try_wait.parity.shared::cta.b64 %p1, [%r10], %r11;
"""

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R41+0x8000], desc[UR18][R26.64], P0 ;
        /*0020*/                   STL [R1], R2 ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/                   LDG.E.U16 R3, desc[UR4][R6.64] ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R41+0x9000], desc[UR18][R28.64], P5 ;
        /*0060*/                   HMMA.16816.F32 R16, R8, R12, R16 ;
        /*0070*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0080*/               @P0 BRA 0x30 ;
        /*0090*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00a0*/               @P1 BRA 0x10 ;
        /*00b0*/                   LDL R2, [R1] ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3+URZ], R4 ;
        /*00e0*/               @!P0 BRA 0xd0 ;
        /*00f0*/                   BRA 0x40 ;
        /*0100*/                   BRA 0x100;
"""


def test_ptx_metrics_count_tensor_cores_async_copies_and_load_widths():
    found = kernel_metrics.ptx_metrics(PTX)
    assert (found["wgmma"], found["mma"]) == (2, 1)
    assert found["cp_async"] == 2 and found["cp_async_bytes"] == {"8": 1, "16": 1}
    assert found["max_wait_group"] == 2 and (found["tma_loads"], found["mbarrier_waits"]) == (1, 1)
    assert found["global_loads"] == {"2": 2, "16": 1}


def test_sass_main_loop_is_the_innermost_loop_with_the_most_tensor_core_instructions():
    found = kernel_metrics.sass_metrics(SASS)
    # loops: 0x30..0x80 (2 HMMA, 6 instructions) inside 0x10..0xa0 (2 HMMA, 10) and a wait's retry loop at 0xd0;
    # 0xf0 -> 0x40 jumps back from out-of-line code (its span holds the EXIT) and 0x100 is the final self-branch
    assert found["loop_instructions"] == 6 and found["loop_mma"] == 2
    assert found["loop_sync_loads"] == {"2": 1} and found["loop_async_copies"] == 1
    assert found["prologue_async_copies"] == 1  # the LDGSTS at 0x10 is before the main loop
    assert found["spill_instructions"] == 2


def test_compiling_refuses_interpreted_kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest on this CPU machine
    variant = Variant("int8", "small-m", "small-m", "float16", {"m": 32, "n": 64, "k": 64})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.profile_variant(variant, 90)


def test_the_variant_sets_cover_the_families_and_the_gate_head_dims():
    full = compile_check.variants()
    assert {v.family for v in full} >= {"sd15", "sdxl", "dit-xl-2", "flux-like", "sd3-like", "video-dit"}
    assert {(v.dtype, v.call.get("todo"), bool(v.call.get("sparse"))) for v in full if v.kernel == "attention"} >= {
        (dtype, todo, sparse) for dtype in ("float16", "bfloat16", "float32")
        for todo, sparse in ((None, False), ("nearest", False), ("average", False), (None, True))}
    quick = attention_variants(quick=True)
    for dtype in ("float16", "bfloat16"):
        assert {v.call["head_dim"] for v in quick if v.dtype == dtype and "todo" not in v.call} >= set(GATE_HEAD_DIMS)
    assert len({v.name for v in full}) == len(full)
    assert {s.family for s in ATTENTION_SHAPES} >= {v.family for v in full if v.kernel == "attention"}


SCRIPT = """
import json, sys
from diffrt.kernels import compile_check
from diffrt.kernels.compile_variants import SHAPES_BY_CASE, Variant

shape = SHAPES_BY_CASE["sdxl-1024-l1"]
out = {}
for arch in (90, 80):
    heuristic = Variant("attention", shape.family, shape.case, "float16", shape.call())
    tiled = Variant("attention", shape.family, shape.case, "float16", shape.call(), tile=(64, 64, 4, 2))
    out[arch] = [compile_check.profile_variant(heuristic, arch), compile_check.profile_variant(tiled, arch)]
    [launch] = compile_check.compile_launch(compile_check.LAUNCHES["attention"](shape.call(), "float16"), arch)
    out[arch].append(launch.kernel.asm["ttir"])
json.dump(out, sys.stdout)
"""


def _compile_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    return env


def test_a_variant_compiles_as_the_jit_specializes_a_real_call(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True,
                          env=_compile_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for arch, (heuristic, tiled, ttir) in json.loads(done.stdout).items():
        # Triton's binder: 16-divisible pointers and strides get hints, the unit stride of D becomes a constant
        signature = next(line for line in ttir.splitlines() if "tt.func public" in line)
        assert "%Q: !tt.ptr<f16> {tt.divisibility = 16" in signature, signature
        assert "%stride_ql: i32 {tt.divisibility = 16" in signature and "%stride_qd" not in signature
        assert heuristic["arch"] == int(arch) and heuristic["shared_limit"] == kernel_metrics.SHARED_LIMIT[int(arch)]
        assert 0 < heuristic["registers"] <= 255 and heuristic["shared_bytes"] > 0
        assert heuristic["wgmma" if arch == "90" else "mma"] > 0 and heuristic["loop_mma"] > 0
        assert heuristic["loop_instructions"] > heuristic["loop_mma"]
        assert (tiled["num_warps"], tiled["num_stages"]) == (4, 2)  # the tile override reaches the launch
        assert (tiled["constants"]["BLOCK_M"], tiled["constants"]["BLOCK_N"]) == (64, 64)
        assert tiled["grid"] == [4096 // 64, 2 * 10]  # query blocks x batch * heads
        assert (heuristic["num_warps"], heuristic["num_stages"]) != (4, 2)


def test_cli_writes_rows_and_failures(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "diffrt.kernels.compile_check", "--arch", "90", "--quick",
                           "--kernels", "int8", "--match", "small-m/int8", "--json", "--out", str(out)],
                          check=False, capture_output=True, text=True, env=_compile_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    written = json.loads(out.read_text())
    assert written["failures"] == [] and written["rows"] == printed
    assert {row["name"] for row in printed} == {"int8/small-m/int8", "int8/small-m/int8/out=int32"}
    assert all(row["wgmma"] > 0 and row["pipelined"] for row in printed)


TMA_SCRIPT = """
import json, sys
import torch, triton, triton.language as tl
from diffrt.kernels import compile_check, kernel_metrics

@triton.jit
def matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [K, 1], [BN, BK])
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(a_desc.load([tl.program_id(0) * BM, k]), b_desc.load([tl.program_id(1) * BN, k]).T, acc)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.float16))

a, b, c = (torch.empty(1024, 512, dtype=torch.float16), torch.empty(1024, 512, dtype=torch.float16),
           torch.empty(1024, 1024, dtype=torch.float16))
[launch] = compile_check.compile_launch(
    lambda: matmul[(8, 8)](a, b, c, 1024, 1024, 512, BM=128, BN=128, BK=64, num_warps=8, num_stages=3), 90)
json.dump(kernel_metrics.metrics(launch.kernel, 90), sys.stdout)
"""


def test_tma_loads_of_any_kernel_count_as_pipelined_async_copies(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    script = tmp_path / "tma_matmul.py"  # @triton.jit needs its source in a file
    script.write_text(TMA_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True,
                          env=_compile_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["tma_loads"] > 0 and found["cp_async"] == 0 and found["mbarrier_waits"] > 0
    assert found["loop_async_copies"] > 0 and found["prologue_async_copies"] > 0
    assert found["pipelined"] and found["stages"] == 3 and found["wgmma"] > 0 and found["loop_sync_loads"] == {}
