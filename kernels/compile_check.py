"""Compile diffrt's Triton kernels for a GPU architecture on a machine without a GPU.

    python -m diffrt.kernels.compile_check [--arch 90] [--quick] [--kernels attention,int8]

Triton compiles ahead of time for an explicit target (``GPUTarget("cuda", arch, 32)``) without a
driver, so a CPU-only machine catches compile errors of every variant (attention: dtypes, head
dims, ToDo modes, sparse or dense; INT8 GEMM: quantizing prologue or int8 input, SmoothQuant,
bias, activations, output dtypes; each at its heuristic tile) and reads each variant's
resources: registers, spilled bytes (``cuobjdump --dump-resource-usage``, shipped with Triton)
and shared memory. Run it with ``TRITON_INTERPRET`` unset (an interpreted kernel cannot be compiled).
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


@dataclass
class Variant:
    kernel: str  # "attention" or "int8"
    dtype: str  # input dtype (int8 x for a pre-quantized GEMM input)
    options: dict  # the kernel's constexpr values and launch options


def attention_variants(quick: bool = False) -> list[Variant]:
    """Every dtype x head dim of real models x ToDo mode x sparse or dense, at the heuristic tile;
    ``quick``: fp16 over head dims 64 / 72 / 160, plus one bf16 and one fp32 variant."""
    from .attention_tiles import heuristic  # noqa: PLC0415
    from .attention_triton import head_dim_chunks  # noqa: PLC0415

    if quick:
        grid = [("float16", dim, mode, sparse) for dim in (64, 72, 160) for mode in (0, 2) for sparse in (False, True)]
        grid += [("bfloat16", 80, 1, True), ("float32", 40, 0, False)]
    else:
        grid = list(itertools.product(["float16", "bfloat16", "float32"], [40, 64, 72, 80, 128, 160, 256], (0, 1, 2),
                                      (False, True)))
    out = []
    for dtype, dim, mode, sparse in grid:
        tile = heuristic(dim, dim, None, mode)
        d1, d2 = head_dim_chunks(dim)
        constants = {"HEAD_DIM": dim, "D1": d1, "D2": d2, "D2P": max(d2, 16), "VALUE_DIM": dim, "V1": d1, "V2": d2,
                     "V2P": max(d2, 16), "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "MODE": mode, "FACTOR": 2,
                     "SPARSE": sparse, "DOT_FP32": False, "IEEE": dtype == "float32",
                     "num_warps": tile.num_warps, "num_stages": tile.num_stages}
        out.append(Variant("attention", dtype, constants))
    return out


def int8_variants(quick: bool = False) -> list[Variant]:
    """The INT8 GEMM: float input quantized in the prologue (fp16 / bf16 / fp32, with and without
    SmoothQuant) or int8 input, bias and activations, float or int32 output, at both heuristic tiles."""
    from .int8_launch import _tiles  # noqa: PLC0415

    inputs = [("float16", True, False), ("bfloat16", True, True), ("int8", False, False)]
    if not quick:
        inputs += [("float32", True, False), ("float16", True, True)]
    out = []
    for (dtype, quantize, smooth), act, m in itertools.product(inputs, (0, 1, 2), (32, 1024)):
        if quick and act == 2:
            continue
        block_m, block_n, block_k, group_m, warps, stages = _tiles(m, 1280, 1280)[0]
        out.append(Variant("int8", dtype, {"QUANTIZE": quantize, "SMOOTH": smooth, "HAS_BIAS": True, "ACT": act,
                                           "OUT_INT32": False, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                           "BLOCK_K": block_k, "GROUP_M": group_m, "num_warps": warps,
                                           "num_stages": stages, "out": "float16" if dtype == "int8" else dtype}))
    block_m, block_n, block_k, group_m, warps, stages = _tiles(1024, 1280, 1280)[0]
    out.append(Variant("int8", "int8", {"QUANTIZE": False, "SMOOTH": False, "HAS_BIAS": False, "ACT": 0,
                                        "OUT_INT32": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                        "GROUP_M": group_m, "num_warps": warps, "num_stages": stages, "out": "int32"}))
    return out


KERNELS = {"attention": attention_variants, "int8": int8_variants}
POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "int8": "*i8", "int32": "*i32"}


def _signature(variant: Variant, arg_names: list[str], constants: dict) -> dict[str, str]:
    signature = {}
    for name in arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif variant.kernel == "attention":
            signature[name] = (POINTER[variant.dtype] if name in ("Q", "K", "V", "O") else
                               "*i32" if name in ("KV_INDEX", "KV_COUNT") else "fp32" if name == "qk_scale" else "i32")
        else:
            pointers = {"X": POINTER[variant.dtype], "W": "*i8", "Y": POINTER[variant.options["out"]], "W_SCALE": "*fp32",
                        "ROW_SCALE": "*fp32", "BIAS": "*fp32", "INV_SMOOTH": "*fp32"}
            signature[name] = pointers.get(name, "i32")
    return signature


def compile_variant(variant: Variant, arch: int):
    """The compiled kernel (triton's CompiledKernel) of ``variant`` for sm_<arch>."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    if variant.kernel == "attention":
        from .attention_triton import attention_kernel as kernel  # noqa: PLC0415
    else:
        from .int8_triton import int8_linear_kernel as kernel  # noqa: PLC0415
    if not hasattr(kernel, "arg_names"):
        raise RuntimeError("the kernel is interpreted (TRITON_INTERPRET is set): unset it to compile")
    options = dict(variant.options)
    launch_options = {"num_warps": options.pop("num_warps"), "num_stages": options.pop("num_stages")}
    options.pop("out", None)
    source = ASTSource(fn=kernel, signature=_signature(variant, kernel.arg_names, options),
                       constexprs={(kernel.arg_names.index(k),): v for k, v in options.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch_options)


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
    parser = argparse.ArgumentParser(prog="python -m diffrt.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="a subset of each kernel's variants")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated: attention, int8")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    args = parser.parse_args(argv)
    failures = 0
    for name in args.kernels.split(","):
        for variant in KERNELS[name](args.quick):
            try:
                usage = resource_usage(compile_variant(variant, args.arch))
            except Exception as error:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                print(f"FAILED {asdict(variant)}: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            row = {**asdict(variant), **usage}
            print(json.dumps(row) if args.json else f"ok {row}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
