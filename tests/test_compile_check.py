"""diffrt's Triton kernels (attention, INT8 GEMM) compile for sm_90 (H100 / H200) and sm_80 on this
GPU-less machine.

Triton compiles ahead of time for an explicit target without a driver, so GPU compile errors of
the kernels' variants are caught on CPU. Runs in a subprocess with TRITON_INTERPRET unset (the
test session interprets Triton).
"""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_variants_compile_for_the_gpu(arch):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "diffrt.kernels.compile_check", "--arch", str(arch), "--quick",
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["kernel"] for row in rows].count("attention") == 14
    assert [row["kernel"] for row in rows].count("int8") == 13
    for row in rows:
        assert 0 < row["shared_bytes"] <= 228 * 1024, row  # fits an SM's shared memory
        if "registers" in row:
            assert row["registers"] <= 255, row
