"""Compile the Triton attention kernel for a GPU architecture on a machine without a GPU.

    python -m diffrt.kernels.attention_compile [--arch 90] [--quick]

Triton compiles ahead of time for an explicit target (``GPUTarget("cuda", arch, 32)``) without a
driver, so a CPU-only machine catches compile errors of every variant (dtypes, head dims, ToDo
modes, sparse or dense, tiles) and reads each variant's resources: registers, spilled bytes
(``cuobjdump --dump-resource-usage``, shipped with Triton) and shared memory.
Run it with ``TRITON_INTERPRET`` unset (an interpreted kernel cannot be compiled).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


@dataclass
class Variant:
    dtype: str
    head_dim: int
    mode: int  # 0 dense keys, 1 nearest, 2 average
    sparse: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def variants(quick: bool = False) -> list[Variant]:
    """The compiled set at the heuristic tiles: every dtype x head dim of real models x ToDo mode x
    sparse or dense; ``quick``: fp16 over head dims 64 / 72 / 160, plus one bf16 and one fp32 variant."""
    from .attention_tiles import heuristic  # noqa: PLC0415

    if quick:
        grid = [("float16", dim, mode, sparse) for dim in (64, 72, 160) for mode in (0, 2) for sparse in (False, True)]
        grid += [("bfloat16", 80, 1, True), ("float32", 40, 0, False)]
    else:
        grid = list(itertools.product(["float16", "bfloat16", "float32"], [40, 64, 72, 80, 128, 160, 256], (0, 1, 2),
                                      (False, True)))
    out = []
    for dtype, dim, mode, sparse in grid:
        tile = heuristic(dim, dim, None, mode)
        out.append(Variant(dtype, dim, mode, sparse, tile.block_m, tile.block_n, tile.num_warps, tile.num_stages))
    return out


def compile_variant(variant: Variant, arch: int):
    """The compiled kernel (triton's CompiledKernel) of ``variant`` for sm_<arch>."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    from . import attention_triton as kernel_module  # noqa: PLC0415

    kernel = kernel_module.attention_kernel
    if not hasattr(kernel, "arg_names"):
        raise RuntimeError("the kernel is interpreted (TRITON_INTERPRET is set): unset it to compile")
    d1, d2 = kernel_module.head_dim_chunks(variant.head_dim)
    constants = {"HEAD_DIM": variant.head_dim, "D1": d1, "D2": d2, "D2P": max(d2, 16), "VALUE_DIM": variant.head_dim,
                 "V1": d1, "V2": d2, "V2P": max(d2, 16), "BLOCK_M": variant.block_m, "BLOCK_N": variant.block_n,
                 "MODE": variant.mode, "FACTOR": 2, "SPARSE": variant.sparse, "DOT_FP32": False,
                 "IEEE": variant.dtype == "float32"}
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "O"):
            signature[name] = TYPES[variant.dtype]
        elif name in ("KV_INDEX", "KV_COUNT"):
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})


def _triton_tool(name: str) -> str | None:
    """A CUDA tool shipped with Triton (backends/nvidia/bin), else one on PATH."""
    import triton  # noqa: PLC0415

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def resource_usage(compiled) -> dict:
    """Registers, spilled / stack bytes (cuobjdump, shipped with Triton) and shared memory of a compiled kernel."""
    usage = {"shared_bytes": getattr(compiled.metadata, "shared", None)}
    tool = _triton_tool("cuobjdump")
    if tool is None or "cubin" not in compiled.asm:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        text = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    for key, name in (("REG", "registers"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        match = re.search(rf"{key}:(\d+)", text)
        if match:
            usage[name] = int(match.group(1))
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.kernels.attention_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="a subset (14 variants; see variants())")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    args = parser.parse_args(argv)
    failures = 0
    for variant in variants(args.quick):
        try:
            usage = resource_usage(compile_variant(variant, args.arch))
        except Exception as error:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAILED {asdict(variant)}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        print(json.dumps({**asdict(variant), **usage}) if args.json else f"ok {asdict(variant)} {usage}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
