"""The CUDA solver step without a GPU: its SASS, and its per-thread code run on the CPU.

csrc/solver_step_cuda.cu is compiled with nvcc to a cubin for each architecture the build targets
(CMakeLists.txt: DIFFRT_CUDA_ARCHS and the CUDA compile options), and ``cuobjdump`` checks every
step kernel: no local memory (no LDL / STL, stack 0: the history lives in registers), 16-byte
loads and stores of the large tensors (LDG.E.128, and LDG.E.64 where cond / uncond vectors are 8
bytes), no FFMA (the step rounds like the PyTorch reference). tests/solver_step_emulation.cu
runs the kernel's dispatch, vector / scalar choice and per-thread code on the CPU, thread after
thread, and its results are compared bit for bit with the fp32 reference (and with an fp64 truth)
on random inputs: every slot count, dtype pair, aligned and unaligned pointers, ragged sizes.
Skipped when nvcc (or cuobjdump) is missing; the compiles run in parallel, once per module.
"""
from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffrt.kernels.solver_step_launch import DTYPE_CODES
from test_solver_step_kernel import STEPS, TOLERANCE, Case, assert_bitwise, make_case, rel_err, run, truth

ROOT = Path(__file__).resolve().parents[1]
CMAKE = (ROOT / "CMakeLists.txt").read_text()
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA step's SASS and emulation need it")

ARCHS = re.search(r'set\(DIFFRT_CUDA_ARCHS "([^"]+)"', CMAKE).group(1).split(";")
CUDA_OPTIONS = re.search(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]+)>", CMAKE).group(1).split()
DTYPES = list(DTYPE_CODES)
MAX_SLOTS = 8
# the kernels' template arguments as c++filt prints them
CPP_TYPES = {"float": torch.float32, "__half": torch.float16, "__nv_bfloat16": torch.bfloat16}


def _find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, in the CUDA toolkit, or Triton's copy."""
    real_nvcc = Path(NVCC).resolve() if NVCC else None
    candidates = [shutil.which("cuobjdump")]
    if real_nvcc is not None:
        candidates.append(real_nvcc.parent / "cuobjdump")
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c is not None and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles the kernels for every architecture and the CPU emulation, all at once (independent
    jobs): {arch: cubin path, "emulation": shared library path}."""
    out = tmp_path_factory.mktemp("solver_step_cuda")
    common = ["-std=c++17", "-I", str(ROOT / "csrc")]
    jobs = {arch: ([NVCC, *common, *CUDA_OPTIONS, "-DDIFFRT_WITH_CUDA=1", f"-arch=sm_{arch}", "-cubin", "-o",
                    str(out / f"sm_{arch}.cubin"), str(ROOT / "csrc" / "solver_step_cuda.cu")], out / f"sm_{arch}.cubin")
            for arch in ARCHS}
    # host code at -O0 builds in seconds; -ffp-contract=off keeps every product and sum rounded on its own
    jobs["emulation"] = ([NVCC, *common, "-O0", "-shared", "-Xcompiler", "-fPIC,-ffp-contract=off", "-o",
                          str(out / "emulation.so"), str(ROOT / "tests" / "solver_step_emulation.cu")],
                         out / "emulation.so")
    running = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, (cmd, _) in jobs.items()}
    for name, proc in running.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"{' '.join(jobs[name][0])} failed:\n{log}"
    return {name: path for name, (_, path) in jobs.items()}


def _kernels(cubin: Path) -> dict:
    """{(T, M, S): {"ops": Counter of SASS opcodes, "resources": "REG:.. STACK:.. .."}} of a cubin's kernels."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (next to nvcc, in /usr/local/cuda/bin or in triton/backends/nvidia/bin)")
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt (binutils) not found: it names the kernels' template arguments")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    resources = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], check=True, capture_output=True,
                               text=True).stdout
    bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.DOTALL))
    usage = dict(re.findall(r"Function (\S+):\n\s*(REG:.*)", resources))
    names = list(bodies)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True,
                               text=True).stdout.split("\n")
    kernels = {}
    for name, pretty in zip(names, demangled):
        match = re.search(r"solver_step_kernel<(\w+), (\w+), (\d+)>", pretty)
        assert match, f"unexpected kernel {pretty}"
        key = (CPP_TYPES[match.group(1)], CPP_TYPES[match.group(2)], int(match.group(3)))
        # "/*0040*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;": the opcode after the address and predicate
        ops = Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", bodies[name]))
        kernels[key] = {"ops": ops, "resources": usage[name]}
    return kernels


@pytest.fixture(scope="module")
def kernels(builds):
    return {arch: _kernels(builds[arch]) for arch in ARCHS}


def _global_accesses(ops: Counter, kind: str, bits: int) -> int:
    """Global loads (kind "LDG") or stores ("STG") of `bits` bits, whatever their other modifiers."""
    return sum(n for op, n in ops.items() if op.startswith(kind + ".") and str(bits) in op.split("."))


def test_the_build_compiles_the_step_as_this_test_does():
    assert ARCHS and all(re.fullmatch(r"\d+a?", arch) for arch in ARCHS), ARCHS
    assert "-fmad=false" in CUDA_OPTIONS  # the reference's rounding: no contraction into FMAs


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_is_compiled(kernels, arch):
    assert set(kernels[arch]) == {(t, m, s) for t in DTYPES for m in DTYPES for s in range(MAX_SLOTS + 1)}


@pytest.mark.parametrize("arch", ARCHS)
def test_no_local_memory(kernels, arch):
    """The history slots and vectors stay in registers: no LDL / STL, no stack, no local memory."""
    for key, kernel in kernels[arch].items():
        local = [op for op in kernel["ops"] if op.split(".")[0] in ("LDL", "STL")]
        assert not local, (arch, key, local)
        assert re.search(r"\bSTACK:0\b", kernel["resources"]) and re.search(r"\bLOCAL:0\b", kernel["resources"]), \
            (arch, key, kernel["resources"])


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_stores_are_16_bytes(kernels, arch):
    """Per kernel: a 16-byte load of x, of the noise draw and of each history slot; cond and uncond
    in 16-byte pieces (8-byte when the model dtype is half the storage dtype's width); one 16-byte
    store site for out and the history (the outputs loop)."""
    for (t, m, s), kernel in kernels[arch].items():
        ops = kernel["ops"]
        cond_bytes = 16 // t.itemsize * m.itemsize  # one vector of cond: 8, 16 or 32 bytes
        want_128 = 2 + s + (2 * (cond_bytes // 16) if cond_bytes >= 16 else 0)
        want_64 = 1 + (2 if cond_bytes == 8 else 0)  # 1: the int64 step index
        assert _global_accesses(ops, "LDG", 128) >= want_128, (arch, t, m, s, ops)
        assert _global_accesses(ops, "LDG", 64) >= want_64, (arch, t, m, s, ops)
        assert _global_accesses(ops, "STG", 128) >= 1, (arch, t, m, s, ops)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_fma(kernels, arch):
    for key, kernel in kernels[arch].items():
        assert kernel["ops"]["FFMA"] == 0 and not any(op.startswith("FFMA.") for op in kernel["ops"]), (arch, key)


# ---- the per-thread code on the CPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def emulate(builds):
    """emulate(case, out, threads=0) -> whether the vector path ran; raises on a dispatch error."""
    lib = ctypes.CDLL(str(builds["emulation"]))
    fn = lib.emulate_solver_step
    fn.argtypes = [ctypes.c_uint64] * 9 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 4 + [ctypes.c_int64,
                                                                                        ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_int

    def call(case: Case, out: torch.Tensor, threads: int = 0) -> bool:
        def ptr(t):
            return 0 if t is None else t.data_ptr()

        vectorized = ctypes.c_int(-1)
        status = fn(ptr(case.x), ptr(case.cond), ptr(case.uncond), ptr(case.history), ptr(case.noise), ptr(out),
                    ptr(case.table), ptr(case.itable), ptr(case.step), case.x.numel(), case.table.shape[0],
                    0 if case.noise is None else case.noise.shape[0], case.itable.shape[1] - 1,
                    0 if case.history is None else case.history.shape[0], DTYPE_CODES[case.x.dtype],
                    DTYPE_CODES[case.cond.dtype], threads, ctypes.byref(vectorized))
        assert status == 0, f"dispatch returned cudaError {status}"
        return bool(vectorized.value)

    return call


def _offset(t: torch.Tensor | None, nbytes: int) -> torch.Tensor | None:
    """The same values, `nbytes` past a fresh (aligned) allocation: 4 bytes puts the pointer off 16-byte
    alignment, 16 bytes keeps it."""
    if t is None:
        return None
    elements = nbytes // t.element_size()
    flat = torch.empty(t.numel() + elements, dtype=t.dtype)[elements:]
    return flat.view(t.shape).copy_(t)


def _expect_vector_path(case: Case, out: torch.Tensor) -> bool:
    """csrc/solver_step_cuda.cuh's can_vectorize, restated."""
    tensors = (case.x, case.cond, case.uncond, case.history, case.noise, out)
    aligned = all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
    slots = 0 if case.history is None else case.history.shape[0]
    draws = 0 if case.noise is None else case.noise.shape[0]
    return aligned and (case.x.numel() % (16 // case.x.element_size()) == 0 or (slots <= 1 and draws <= 1))


def _check_emulation(emulate, case: Case, threads: int = 0, in_place: bool = False, offset: int = 0) -> bool:
    """Emulated kernel == fp32 reference bit for bit (out and every history slot), and within the
    dtype's tolerance of the fp64 truth; returns whether the vector path ran. `offset`: the tensors'
    byte offset from an aligned allocation."""
    ref_out, ref_hist = run(case, "reference")
    true_out, true_hist = truth(case)
    c = case.clone()
    if offset:
        c = replace(c, x=_offset(c.x, offset), cond=_offset(c.cond, offset), uncond=_offset(c.uncond, offset),
                    history=_offset(c.history, offset), noise=_offset(c.noise, offset))
    out = c.x if in_place else _offset(torch.full_like(c.x, math.nan), offset)
    expected_path = _expect_vector_path(c, out)
    vectorized = emulate(c, out, threads)
    assert vectorized == expected_path
    assert_bitwise(out, ref_out)
    assert rel_err(out, true_out) <= TOLERANCE[case.x.dtype]
    if case.history is not None:
        assert_bitwise(c.history, ref_hist)
        assert rel_err(c.history, true_hist) <= TOLERANCE[case.x.dtype]
    return vectorized


# (uncond, history slots S, outputs, noise draws): every S the kernels are compiled for
SLOT_CONFIGS = [(True, 0, 1, 0), (False, 1, 2, 1), (True, 2, 3, 2), (True, 3, 2, 0), (False, 4, 3, 3),
                (True, 5, 2, 1), (True, 6, 3, 2), (False, 7, 2, 0), (True, 8, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
def test_emulated_kernel_matches_the_reference(emulate, dtype, model_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 3 + DTYPES.index(model_dtype))
    for uncond, slots, n_out, n_noise in SLOT_CONFIGS:
        # 2*4*8*8: whole vectors (the vector path); 3*67: a ragged tail (vector path only without a
        # second slot or draw, else scalar); 7 threads stride over many vectors each
        for shape, threads in (((2, 4, 8, 8), 0), ((2, 4, 8, 8), 7), ((3, 67), 0)):
            case = make_case(shape, dtype, model_dtype, uncond, slots, n_out, n_noise, gen)
            vectorized = _check_emulation(emulate, case, threads)
            assert vectorized == (shape != (3, 67) or (slots <= 1 and n_noise <= 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_unaligned_pointers_take_the_scalar_path(emulate, dtype):
    gen = torch.Generator().manual_seed(11)
    case = make_case((2, 4, 8, 8), dtype, torch.float16, True, 3, 3, 2, gen, clamp=(-0.25, 0.5))
    assert not _check_emulation(emulate, case, offset=4)
    assert _check_emulation(emulate, case, offset=16)  # a whole vector off: aligned again


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_in_place(emulate, dtype):
    gen = torch.Generator().manual_seed(12)
    for shape in ((2, 4, 8, 8), (3, 67)):
        case = make_case(shape, dtype, torch.float32, True, 2, 3, 2, gen)
        _check_emulation(emulate, case, threads=5, in_place=True)


def test_emulated_bad_rows_fill_out_with_nan(emulate):
    gen = torch.Generator().manual_seed(13)
    case = make_case((2, 4, 8, 8), torch.float16, torch.float16, True, 2, 2, 1, gen)
    bad_noise, bad_slot = case.itable.clone(), case.itable.clone()
    bad_noise[2, 0], bad_slot[2, 2] = 1, 2
    for bad in (replace(case, step=torch.tensor(STEPS)), replace(case, step=torch.tensor(-1)),
                replace(case, itable=bad_noise), replace(case, itable=bad_slot)):
        c = bad.clone()
        out = torch.zeros_like(c.x)
        emulate(c, out, threads=3)
        assert torch.isnan(out).all()
        assert_bitwise(c.history, case.history)  # untouched
