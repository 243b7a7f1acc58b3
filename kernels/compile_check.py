"""Compile diffrt's Triton kernels for sm_90 / sm_80 as the JIT compiles them, on a machine without a GPU,
and report what the compiler made of each variant.

Library (stable signatures):

    profile_variant(variant: Variant, arch: int) -> dict
        compile one variant as Triton's JIT would for a real call on sm_<arch>; the variant's
        fields plus :func:`diffrt.kernels.kernel_metrics.metrics` (registers, stack / spills, shared
        memory against the arch's limit, wgmma / mma, cp.async / TMA, global load widths,
        pipelining, SASS instructions per main-loop iteration)
    compile_launch(launch: Callable[[], object], arch: int, tile=None) -> list[CompiledLaunch]
        every Triton kernel ``launch()`` launches, compiled for sm_<arch> instead of launched:
        (kernel: triton's CompiledKernel, grid: the launch grid, constants: its constexpr keywords)
    variants(quick=False, kernels=("attention", "int8")) -> list[Variant]
        realistic calls of every model family (:mod:`diffrt.kernels.compile_variants`)

    e.g. profile_variant(Variant("attention", "sdxl", "sdxl-1024-l1", "float16",
                                 {"batch": 2, "heads": 10, "head_dim": 64, "grid": (64, 64)}), 90)

CLI:

    python -m diffrt.kernels.compile_check [--arch 90,80] [--quick] [--kernels attention,int8] [--match TEXT]
                                           [--json] [--out FILE]

How a variant is compiled "as the JIT does": the op's own launcher (``attention_launch._run_triton``,
``int8_launch._run_triton``, the functions the registry runs on CUDA) is called with CPU tensors of
the real shapes and strides (``torch.empty``: 16-byte aligned, never touched), while Triton's
active driver is a stand-in that names the target ``GPUTarget("cuda", arch, 32)`` and each
kernel's ``run`` is called with ``warmup=True``. So Triton binds the real arguments itself (its
binder turns integers equal to 1 into constants and gives pointers and integers divisible by 16
``tt.divisibility`` hints), parses the launch options and compiles, without a launch. The tile is
the one the untuned path runs (the autotuner returns the heuristic off CUDA), or ``variant.tile``.
The signature and hints are Triton's, so the compile follows Triton's version (3.6 on the GPU
machine, 3.9 here). Compiled kernels are cached in memory per (arch, specialization); set
``TRITON_CACHE_DIR`` to a temporary folder (the CLI does) so nothing stale is reused from disk.
Run it with ``TRITON_INTERPRET`` unset (an interpreted kernel cannot be compiled). While a compile
runs, every Triton launch of the process compiles instead of running: not for a process that
launches kernels from other threads at the same time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, NamedTuple

from .compile_variants import Variant, attention_variants, int8_variants

ARCHS = (90, 80)


class CompiledLaunch(NamedTuple):
    """One kernel launch, compiled instead of run: the CompiledKernel, its grid (None when the launcher
    passes a callable) and the launch's constexpr / option keywords with plain values (BLOCK_M, num_warps, ...)."""

    kernel: Any
    grid: tuple | None
    constants: dict


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target; launches nothing."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> str:
        return f"compile-check-sm{self.target.arch}"  # the JIT's per-device cache key: never a real device

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch  # noqa: PLC0415

        return torch.device("cpu")


@contextlib.contextmanager
def _compiling_for(arch: int, tile: tuple | None) -> Iterator[list]:
    """Inside: Triton kernel launches compile for sm_<arch> and are collected, not launched; the
    autotuner returns ``tile`` when given."""
    from triton.runtime.driver import driver  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    from . import autotune  # noqa: PLC0415

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: TRITON_INTERPRET is set, so the kernels are interpreted; unset it to "
                           "compile")
    compiled: list = []
    run, choose, previous = JITFunction.run, autotune.choose, getattr(driver, "_active", None)

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        plain = {key: value for key, value in kwargs.items() if isinstance(value, (bool, int, float, str))}
        compiled.append(CompiledLaunch(kernel, None if callable(grid) else tuple(grid), plain))
        return kernel

    def fixed_tile(op, key, candidates, launch, device):
        return _as_tile(tile, candidates[0])

    JITFunction.run = compile_only
    if tile is not None:
        autotune.choose = fixed_tile
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield compiled
    finally:
        JITFunction.run, autotune.choose = run, choose
        driver.set_active(previous)


def _as_tile(tile: tuple, like: Any) -> Any:
    """``tile`` in the launcher's own tile type (a Tile dataclass or a plain tuple)."""
    return tile if isinstance(like, tuple) else type(like)(*tile)


def compile_launch(launch: Callable[[], object], arch: int, tile: tuple | None = None) -> list[CompiledLaunch]:
    """Every Triton kernel ``launch()`` launches, compiled for sm_<arch> as the JIT would (module docstring)."""
    with _compiling_for(arch, tile) as compiled:
        launch()
    if not compiled:
        raise RuntimeError("compile_check: the call launched no Triton kernel")
    return compiled


def _attention_launch(call: dict, dtype: str) -> Callable[[], object]:
    import torch  # noqa: PLC0415

    from . import attention_launch, attention_masks  # noqa: PLC0415
    from .attention_spec import KVDownsample  # noqa: PLC0415

    torch_dtype = getattr(torch, dtype)
    grid = tuple(call["grid"])
    q_len = math.prod(grid)
    k_len = call.get("k_len") or q_len
    q = torch.empty(call["batch"], q_len, call["heads"], call["head_dim"], dtype=torch_dtype)
    k, v = (torch.empty(call["batch"], k_len, call["heads"], call["head_dim"], dtype=torch_dtype) for _ in "kv")
    down = KVDownsample(grid, 2, call["todo"]) if call.get("todo") else None
    mask = None
    if call.get("sparse"):
        k_grid = down.out_grid if down else None
        mask = attention_masks.local_window(grid, 2, 64, 64, k_grid=k_grid)
    attention_launch._check(q, k, v, None, down, mask)
    return lambda: attention_launch._run_triton(q, k, v, None, down, mask)


def _int8_launch(call: dict, dtype: str) -> Callable[[], object]:
    import torch  # noqa: PLC0415

    from . import int8_launch  # noqa: PLC0415

    m, n, k = call["m"], call["n"], call["k"]
    x = torch.empty(m, k, dtype=getattr(torch, dtype))
    w_q = torch.empty(n, k, dtype=torch.int8)
    w_scale, row_scale, bias = torch.empty(n), torch.empty(m), torch.empty(n)
    inv_smooth = torch.empty(k) if call.get("smooth") else None
    out = torch.int32 if call.get("out") == "int32" else None
    args = (x, w_q, w_scale, row_scale, bias, call.get("act"), inv_smooth, out)
    int8_launch._check(*args)
    return lambda: int8_launch._run_triton(*args)


LAUNCHES = {"attention": _attention_launch, "int8": _int8_launch}


def profile_variant(variant: Variant, arch: int) -> dict:
    """Compile ``variant`` for sm_<arch> as the JIT would; its fields, ``arch`` and the metrics of
    :func:`diffrt.kernels.kernel_metrics.metrics` of the first kernel it launches, with its launch ``grid``
    and ``constants`` (the tile: BLOCK_M, BLOCK_N, ..., num_warps, num_stages)."""
    from .kernel_metrics import metrics  # noqa: PLC0415

    if variant.kernel not in LAUNCHES:
        raise ValueError(f"compile_check: unknown kernel {variant.kernel!r}; one of {', '.join(LAUNCHES)}")
    launch = compile_launch(LAUNCHES[variant.kernel](variant.call, variant.dtype), arch, variant.tile)[0]
    return {"name": variant.name, **asdict(variant), "arch": arch, "grid": launch.grid, "constants": launch.constants,
            **metrics(launch.kernel, arch)}


def variants(quick: bool = False, kernels: tuple[str, ...] = tuple(LAUNCHES),
             match: str | None = None) -> list[Variant]:
    """The variants to check: realistic calls of every model family (``quick``: the CI gate's set);
    ``match``: only those whose name contains this text."""
    sets = {"attention": attention_variants, "int8": int8_variants}
    unknown = set(kernels) - set(sets)
    if unknown:
        raise ValueError(f"compile_check: unknown kernels {sorted(unknown)}; one of {', '.join(sets)}")
    return [variant for name in kernels for variant in sets[name](quick) if match is None or match in variant.name]


def run(archs: tuple[int, ...], quick: bool = False, kernels: tuple[str, ...] = tuple(LAUNCHES),
        match: str | None = None, report: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Profile every variant for every arch: (rows, failures). A failure is the variant's fields,
    ``arch`` and ``error`` (a compile error, e.g. out of resources); ``report`` sees each row."""
    rows, failures = [], []
    for arch in archs:
        for variant in variants(quick, kernels, match):
            try:
                row = profile_variant(variant, arch)
            except Exception as error:  # noqa: BLE001 - every failing variant is reported, then the run fails
                row = {"name": variant.name, **asdict(variant), "arch": arch,
                       "error": f"{type(error).__name__}: {error}"}
                failures.append(row)
            else:
                rows.append(row)
            if report is not None:
                report(row)
    return rows, failures


def _summary(row: dict) -> str:
    if "error" in row:
        return f"FAILED sm_{row['arch']} {row['name']}: {row['error'][:300]}"
    return (f"ok sm_{row['arch']} {row['name']}: {row['registers']} regs, stack {row['stack_bytes']}, smem "
            f"{row['shared_bytes']}/{row['shared_limit']}, wgmma {row['wgmma']}, mma {row['mma']}, cp.async "
            f"{row['cp_async']}, tma {row['tma_loads']}, stages {row['stages']}, loop {row['loop_instructions']} ins")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities x 10")
    parser.add_argument("--quick", action="store_true", help="the CI gate's subset")
    parser.add_argument("--kernels", default=",".join(LAUNCHES), help="comma-separated: attention, int8")
    parser.add_argument("--match", help="only the variants whose name contains this text, e.g. 'sweep-hd96' or "
                                        "'sdxl-1024-l1/float16'")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant (else one line each)")
    parser.add_argument("--out", help="also write {'rows': [...], 'failures': [...]} to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="diffrt-compile-check-"))
    archs = tuple(int(arch) for arch in args.arch.split(","))
    rows, failures = run(archs, args.quick, tuple(args.kernels.split(",")), args.match,
                         lambda row: print(json.dumps(row) if args.json else _summary(row), flush=True))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"rows": rows, "failures": failures}, handle, indent=1)
    for row in failures:
        print(_summary(row), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
