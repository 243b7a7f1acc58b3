"""What the compiler made of a Triton kernel: static metrics read from its PTX and its cubin.

``metrics(compiled, arch) -> dict`` for a ``triton.compiler.CompiledKernel`` compiled for sm_<arch>:

======================  =================================================================================
registers               per thread (``cuobjdump --dump-resource-usage``; cuobjdump ships with Triton)
stack_bytes             per-thread stack frame (> 0: registers spilled, or a local array)
local_bytes             per-thread local memory
spill_instructions      STL / LDL instructions in the SASS (register spills and their reloads)
shared_bytes            dynamic shared memory the launch asks for (Triton's metadata)
shared_limit            the arch's per-block opt-in maximum (``SHARED_LIMIT``); ``shared_fits``
num_warps, num_stages   the launch options the kernel was compiled with
wgmma, mma              tensor-core instructions in the PTX (``wgmma.mma_async``; ``mma.sync``)
cp_async                ``cp.async`` copies global -> shared, ``cp_async_bytes`` their sizes {bytes: count}
tma_loads               ``cp.async.bulk.tensor`` (TMA) copies global -> shared
max_wait_group          the largest N of ``cp.async.wait_group N`` (copy groups left in flight at a wait)
mbarrier_waits          ``mbarrier.try_wait`` sites (how TMA loads are awaited)
global_loads            synchronous ``ld.global`` by width {bytes: count} (16: 128-bit vector loads)
pipelined               the loads run ahead of the math: the main loop issues async copies (cp.async or
                        TMA) and the prologue before it issues some too (the first tiles), so each
                        iteration fetches a later iteration's tiles; ``stages``: num_stages when
                        pipelined, else 1
loop_instructions       SASS instructions in one iteration of the main loop: the innermost loop
                        (backward branch) holding the most tensor-core instructions (else the largest);
                        a backward branch whose span holds an EXIT is out-of-line code (an mbarrier
                        wait's retry block placed after the kernel's end) jumping back, not a loop
loop_mma                tensor-core instructions (HGMMA / HMMA / IMMA) in that loop's body
loop_sync_loads         synchronous global loads (LDG) in that loop's body, by width {bytes: count}
loop_async_copies       LDGSTS (cp.async) + UTMALDG (TMA) in that loop's body; ``prologue_async_copies``
                        the ones before the loop
======================  =================================================================================

All counts are static (instructions in the code, not executed ones).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter

# The largest dynamic shared memory one block may opt in to, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_MMA_SASS = ("HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA")
_LDG_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def triton_tool(name: str) -> str | None:
    """A CUDA binary tool shipped with Triton (backends/nvidia/bin), else one on PATH, else None."""
    import triton  # noqa: PLC0415

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = triton_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found: Triton ships one under backends/nvidia/bin, the CUDA toolkit another")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        done = subprocess.run([tool, *flags, handle.name], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def resource_usage(cubin: bytes) -> dict:
    """registers, stack_bytes, local_bytes of the cubin's kernel (cuobjdump --dump-resource-usage)."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        match = re.search(rf"\b{key}:(\d+)", text)
        usage[name] = int(match.group(1)) if match else None
    return usage


def ptx_metrics(ptx: str) -> dict:
    """Tensor-core instructions, async copies and global load widths counted in the PTX."""
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ptx)
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    loads = Counter()
    for suffix in re.findall(r"\bld\.global((?:\.[\w:]+)*)", ptx):
        vector = re.search(r"\.v(\d)", suffix)
        bits = re.search(r"\.[bufs](\d+)\b", suffix)
        loads[(int(vector.group(1)) if vector else 1) * (int(bits.group(1)) if bits else 32) // 8] += 1
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma": len(re.findall(r"\bmma\.sync", ptx)),
            "cp_async": len(copies), "cp_async_bytes": _sorted(Counter(int(size, 0) for size in copies)),
            "tma_loads": len(re.findall(r"\bcp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global", ptx)),
            "max_wait_group": max(waits, default=None), "mbarrier_waits": len(re.findall(r"\bmbarrier\.try_wait", ptx)),
            "global_loads": _sorted(loads)}


def _sorted(counter: Counter) -> dict:
    return {str(key): counter[key] for key in sorted(counter)}


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every SASS instruction, in order."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def main_loop(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The body of the main loop (module docstring), [] when the code has no loop."""
    loops = []
    for address, opcode, operands in instructions:
        target = _BRANCH_TARGET.search(operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [ins for ins in instructions if start <= ins[0] <= address]
            if not any(op.startswith("EXIT") for _, op, _ in body):  # not a jump back from out-of-line code
                loops.append(body)
    if not loops:
        return []

    def mma_count(body) -> int:
        return sum(op.startswith(_MMA_SASS) for _, op, _ in body)

    most = max(mma_count(body) for body in loops)
    if most == 0:
        return max(loops, key=len)
    return min((body for body in loops if mma_count(body) == most), key=len)


def _ldg_width(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in _LDG_WIDTH:
            return _LDG_WIDTH[part]
    return 4


def sass_metrics(sass: str) -> dict:
    """Spill instructions and the main loop's size, tensor-core instructions and loads."""
    instructions = sass_instructions(sass)
    body = main_loop(instructions)
    loads = Counter(_ldg_width(op) for _, op, _ in body if op.split(".")[0] == "LDG")
    start = body[0][0] if body else 0
    return {"spill_instructions": sum(op.split(".")[0] in ("STL", "LDL") for _, op, _ in instructions),
            "loop_instructions": len(body), "loop_mma": sum(op.startswith(_MMA_SASS) for _, op, _ in body),
            "loop_sync_loads": _sorted(loads),
            "loop_async_copies": sum(_is_async_copy(op) for _, op, _ in body),
            "prologue_async_copies": sum(_is_async_copy(op) for address, op, _ in instructions if address < start)}


def _is_async_copy(opcode: str) -> bool:
    return opcode.split(".")[0] in ("LDGSTS", "UTMALDG")


def metrics(compiled, arch: int) -> dict:
    """The module docstring's metrics of a CompiledKernel compiled for sm_<arch>."""
    meta = compiled.metadata
    shared = int(meta.shared)
    limit = SHARED_LIMIT.get(arch)
    row = {"kernel_name": meta.name, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
           "shared_bytes": shared, "shared_limit": limit, "shared_fits": None if limit is None else shared <= limit}
    row.update(resource_usage(compiled.asm["cubin"]))
    row.update(ptx_metrics(compiled.asm["ptx"]))
    row.update(sass_metrics(_cuobjdump(compiled.asm["cubin"], "-sass")))
    running_ahead = row["loop_async_copies"] > 0 and row["prologue_async_copies"] > 0
    row["pipelined"] = bool(running_ahead)
    row["stages"] = meta.num_stages if running_ahead else 1
    return row
