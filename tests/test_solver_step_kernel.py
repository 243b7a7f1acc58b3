"""The fused solver step: every backend against the PyTorch reference and an fp64 truth.

Backends (reference, cpu; cuda on GPU machines) x storage dtypes x model-output dtypes x odd
shapes, each over several configurations (uncond or not, S = 0..3 history slots, 1..3 outputs
with some slots -1, noise or not). Inputs are fresh random values, outputs are poisoned with
NaN before the kernel runs. The C++ kernel rounds exactly like the fp32 reference (same
operation order, no FMA, round-to-nearest-even conversions), so it is asserted bit-identical.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from diffrt.kernels import BackendUnavailable, PreparedStep, registry, solver_step, solver_step_reference
from diffrt.kernels.solver_step import table_width

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (3, 4099): several 1024-element chunks of the C++ kernel and a ragged last one
SHAPES = [(1, 3, 7, 5), (2, 4, 64, 64), (3, 4099), (1,)]
# (uncond, history slots S, outputs n_out, noise draws)
CONFIGS = [(True, 0, 1, 0), (False, 1, 2, 1), (True, 2, 3, 2), (True, 3, 2, 0), (False, 3, 3, 3)]
# max |kernel - fp64| / max(max |fp64|, 1) per storage dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
STEPS = 4


@dataclass
class Case:
    x: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    history: torch.Tensor | None
    noise: torch.Tensor | None
    table: torch.Tensor
    itable: torch.Tensor
    step: torch.Tensor

    def args(self) -> tuple:
        return (self.x, self.cond, self.uncond, self.history, self.noise, self.table, self.itable, self.step)

    def clone(self) -> "Case":
        return Case(*[None if t is None else t.clone() for t in self.args()])

    def to(self, device: str) -> "Case":
        return Case(*[None if t is None else t.to(device) for t in self.args()])


def make_case(shape, dtype, model_dtype, uncond, slots, n_out, n_noise, gen, step=2, clamp=None) -> Case:
    """Random inputs (never zeros), a random table and int table with some slots -1."""
    def randn(*size, dt):
        return torch.randn(*size, generator=gen).to(dt)

    table = torch.randn(STEPS, table_width(n_out, slots), generator=gen)
    lo, hi = clamp if clamp is not None else (-math.inf, math.inf)
    table[:, 3], table[:, 4] = lo, hi
    itable = torch.full((STEPS, 1 + n_out), -1, dtype=torch.int32)
    if n_noise:
        itable[:, 0] = torch.randint(-1, n_noise, (STEPS,), generator=gen, dtype=torch.int32)
    if n_out > 1:
        itable[:, 2:] = torch.randint(-1, slots, (STEPS, n_out - 1), generator=gen, dtype=torch.int32)
        itable[step, 2] = slots - 1  # the chosen row writes at least one slot
    return Case(randn(*shape, dt=dtype), randn(*shape, dt=model_dtype),
                randn(*shape, dt=model_dtype) if uncond else None,
                randn(slots, *shape, dt=dtype) if slots else None,
                randn(n_noise, *shape, dt=dtype) if n_noise else None,
                table, itable, torch.tensor(step, dtype=torch.int64))


def run(case: Case, backend: str, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, history after) for a copy of ``case``; out poisoned with NaN first."""
    c = case.clone()
    if in_place:
        out = c.x
    else:
        out = torch.full_like(c.x, math.nan)
    result = solver_step(*c.args(), out=out, backend=backend)
    assert result is out
    return out, c.history


def truth(case: Case) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference in float64 on float64 copies."""
    c = Case(*[t if t is None or not t.is_floating_point() else t.double() for t in case.args()])
    out = solver_step_reference(*c.args(), compute_dtype=torch.float64)
    return out, c.history


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1): the terms are O(1), so a tiny result is judged on that scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(-1).view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(-1).view(torch.int16 if b.element_size() == 2 else torch.int32))


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_and_fp64(backend, dtype, model_dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, model_dtype, shape)).encode()))
    for uncond, slots, n_out, n_noise in CONFIGS:
        case = make_case(shape, dtype, model_dtype, uncond, slots, n_out, n_noise, gen)
        out, hist = run(case.to(device_of(backend)), backend)
        ref_out, ref_hist = run(case, "reference")
        true_out, true_hist = truth(case)
        assert not torch.isnan(out).any()
        err, ref_err = rel_err(out.cpu(), true_out), rel_err(ref_out, true_out)
        assert err <= TOLERANCE[dtype], (uncond, slots, n_out, n_noise, err)
        assert err <= 2 * ref_err + 1e-12, (err, ref_err)
        if backend == "cpu":  # the C++ kernel rounds exactly like the fp32 reference
            assert_bitwise(out, ref_out)
        if slots:
            written = {int(s) for s in case.itable[int(case.step), 2:] if s >= 0}
            for j in range(slots):
                if j in written:
                    assert rel_err(hist[j].cpu(), true_hist[j]) <= TOLERANCE[dtype]
                    if backend == "cpu":
                        assert_bitwise(hist[j], ref_hist[j])
                else:
                    assert_bitwise(hist[j].cpu(), case.history[j])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_out_is_x(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    case = make_case((2, 3, 9, 11), dtype, torch.float32, True, 2, 3, 2, gen)
    out, hist = run(case.to(device_of(backend)), backend, in_place=True)
    ref_out, ref_hist = run(case, "reference")
    assert rel_err(out.cpu(), ref_out) <= TOLERANCE[dtype]
    assert rel_err(hist.cpu(), ref_hist) <= TOLERANCE[dtype]
    if backend == "cpu":
        assert_bitwise(out, ref_out)
        assert_bitwise(hist, ref_hist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_index_is_read_from_the_tensor(backend):
    gen = torch.Generator().manual_seed(2)
    case = make_case((1, 4, 8, 8), torch.float32, torch.float32, True, 1, 2, 2, gen).to(device_of(backend))
    outs = []
    for step in range(STEPS):
        case.step.fill_(step)  # in place, as the sampler advances it
        out, _ = run(case, backend)
        ref, _ = run(case.to("cpu"), "reference")
        assert rel_err(out.cpu(), ref) <= 1e-6
        outs.append(out.cpu())
    assert all(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(3)
    case = make_case((2, 3, 6, 10), torch.float16, torch.bfloat16, True, 2, 2, 2, gen).to(device_of(backend))
    strided = replace(case, x=case.x.transpose(2, 3).contiguous().transpose(2, 3),
                      cond=torch.cat([case.cond, case.cond], dim=-1)[..., :10],
                      uncond=case.uncond.transpose(0, 1).contiguous().transpose(0, 1),
                      noise=case.noise.transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided.x.is_contiguous() and not strided.cond.is_contiguous() and not strided.noise.is_contiguous()
    out = torch.full_like(case.x, math.nan)
    hist = case.history.clone()
    solver_step(*replace(strided, history=hist).args(), out=out, backend=backend)
    ref, ref_hist = run(case.to("cpu"), "reference")
    assert rel_err(out.cpu(), ref) <= TOLERANCE[torch.float16]
    assert rel_err(hist.cpu(), ref_hist) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    case = make_case((3, 5, 7), dtype, dtype, True, 1, 2, 1, gen, clamp=(-0.25, 0.5))
    x0 = case.table[2, 0] * case.cond.float() + case.table[2, 2] * case.x.float() + case.table[2, 1] * case.uncond.float()
    assert (x0 < -0.25).sum() > 10 and (x0 > 0.5).sum() > 10  # both bounds bite
    out, _ = run(case.to(device_of(backend)), backend)
    ref, _ = run(case, "reference")
    true_out, _ = truth(case)
    assert rel_err(out.cpu(), true_out) <= TOLERANCE[dtype]
    if backend == "cpu":
        assert_bitwise(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_to_storage_dtype_is_bitwise(dtype):
    """x0's rounding (fp32 -> fp16/bf16): ties, subnormals, overflow, a wide exponent range."""
    gen = torch.Generator().manual_seed(5)
    special = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 2**-24 * 1.5, 2**-14 * (1 - 2**-11),
                            65504.0, 65519.99, 65520.0, 1e9, 1 + 2**-8, 1 + 3 * 2**-8, 2**-133, 3e38, 0.0])
    wide = torch.randn(4000, generator=gen) * torch.exp2(torch.randint(-40, 40, (4000,), generator=gen).float())
    cond = torch.cat([special, -special, wide])
    case = make_case(tuple(cond.shape), dtype, torch.float32, False, 0, 1, 0, gen)
    case.cond = cond
    case.table.zero_()
    case.table[:, 0], case.table[:, 3], case.table[:, 4], case.table[:, 6] = 1.0, -math.inf, math.inf, 1.0
    out, _ = run(case, "cpu")
    ref, _ = run(case, "reference")
    assert_bitwise(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widening_every_16_bit_pattern_is_bitwise(dtype):
    """Every fp16 / bf16 bit pattern read as x and written back as out = 1 * x: finite values (subnormals
    included) come back as the same value, with the reference's bits; inf and NaN inputs give NaN (the step adds 0 * x0, x0 NaN), as in the
    reference. NaN payloads are not part of the contract."""
    gen = torch.Generator().manual_seed(8)
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    case = make_case(tuple(patterns.shape), dtype, torch.float32, False, 0, 1, 0, gen)
    case.x = patterns
    case.table.zero_()
    case.table[:, 3], case.table[:, 4], case.table[:, 5] = -math.inf, math.inf, 1.0
    out, _ = run(case, "cpu")
    ref, _ = run(case, "reference")
    finite = torch.isfinite(patterns)
    assert torch.equal(out.isnan(), ~finite) and torch.equal(ref.isnan(), ~finite)
    assert torch.equal(out[finite], patterns[finite])  # values: -0 + (+0) gives +0
    assert_bitwise(out[finite], ref[finite])


def test_too_many_slots_falls_back_to_reference_with_a_logged_reason(caplog):
    gen = torch.Generator().manual_seed(6)
    case = make_case((2, 5), torch.float32, torch.float32, True, 9, 2, 0, gen)
    registry.clear_cache()
    with caplog.at_level("WARNING", logger="diffrt.kernels"):
        out, _ = run(case, "auto")
    assert "9 slots" in caplog.text and "'reference'" in caplog.text
    assert_bitwise(out, run(case, "reference")[0])
    with pytest.raises(BackendUnavailable, match="at most 8"):
        run(case, "cpu")


def _base_case() -> Case:
    return make_case((2, 3, 4), torch.float32, torch.float32, True, 2, 2, 1, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("change, error, message", [
    (lambda c: replace(c, cond=c.cond[:1]), ValueError, r"cond has shape \(1, 3, 4\), x has \(2, 3, 4\)"),
    (lambda c: replace(c, uncond=c.uncond.half()), TypeError, "uncond is torch.float16"),
    (lambda c: replace(c, history=c.history[:, :1]), ValueError, r"history has shape \(2, 1, 3, 4\)"),
    (lambda c: replace(c, noise=c.x), ValueError, r"noise has shape \(2, 3, 4\); expected \[n, \*x.shape\]"),
    (lambda c: replace(c, history=c.history.half()), TypeError, "history has dtype torch.float16"),
    (lambda c: replace(c, x=c.x.double()), TypeError, "x has dtype torch.float64"),
    (lambda c: replace(c, cond=c.cond.int()), TypeError, "cond has dtype torch.int32"),
    (lambda c: replace(c, table=c.table[:, :-1]), ValueError, "table has 18 columns; 2 outputs and 2 history slots"),
    (lambda c: replace(c, table=c.table.double()), TypeError, "table must be a 2-D float32"),
    (lambda c: replace(c, itable=c.itable.long()), TypeError, "itable must be a 2-D int32"),
    (lambda c: replace(c, itable=c.itable[:2]), ValueError, r"itable has shape \(2, 3\), table \(4, 19\)"),
    (lambda c: replace(c, history=None, table=c.table[:, :15]), ValueError, "history is needed"),
    (lambda c: replace(c, step=c.step.int()), TypeError, "step must be a 0-dim int64"),
    (lambda c: replace(c, step=c.step.reshape(1)), TypeError, "step must be a 0-dim int64"),
    (lambda c: replace(c, step=c.step.to("meta")), ValueError, "step is on meta but x is on cpu"),
    (lambda c: replace(c, noise=c.noise.to("meta")), ValueError, "noise is on meta"),
    (lambda c: replace(c, history=c.history.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     r"history \(2, 2, 3, 4\) must be contiguous"),
])
def test_bad_inputs_raise_clear_errors(change, error, message):
    case = change(_base_case())
    with pytest.raises(error, match=message):
        solver_step(*case.args())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_out_raises(backend):
    case = _base_case()
    for out in (torch.empty(2, 3, 5), torch.empty(2, 3, 4, dtype=torch.float16), torch.empty(2, 4, 3).transpose(1, 2)):
        with pytest.raises(ValueError, match=r"out must be contiguous with x's shape \(2, 3, 4\)"):
            solver_step(*case.args(), out=out, backend=backend)


def test_bad_rows_raise_on_cpu():
    case = _base_case()
    with pytest.raises(ValueError, match="step index 4 is outside the table's 4 rows"):
        solver_step(*replace(case, step=torch.tensor(4)).args(), backend="cpu")
    itable = case.itable.clone()
    itable[2, 0] = 5
    with pytest.raises(ValueError, match="draws noise 5 but noise has 1 draws"):
        solver_step(*replace(case, itable=itable).args(), backend="cpu")
    itable = case.itable.clone()
    itable[2, 2] = 2
    with pytest.raises(ValueError, match="writes a history slot >= 2"):
        solver_step(*replace(case, itable=itable).args(), backend="cpu")


def test_forced_and_unknown_backends():
    case = _base_case()
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot serve this call: serves cuda tensors"):
        solver_step(*case.args(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'triton'; choose one of auto, cuda, cpu, reference"):
        solver_step(*case.args(), backend="triton")


@pytest.mark.gpu
def test_cuda_step_needs_no_host_sync():
    case = make_case((2, 4, 16, 16), torch.float16, torch.float16, True, 2, 2, 1, torch.Generator().manual_seed(8))
    case = case.to("cuda")
    out = torch.empty_like(case.x)
    solver_step(*case.args(), out=out, backend="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        solver_step(*case.args(), out=out, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = replace(case, step=torch.tensor(STEPS, device="cuda"))
    solver_step(*bad.args(), out=out, backend="cuda")
    assert torch.isnan(out).all()  # a step outside the table cannot raise on the device


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("copies", [1, 2])
def test_prepared_step_writes_the_next_input_and_advances(backend, dtype, copies):
    """PreparedStep(..., scaled, scale, advance=True): the step as solver_step gives it, ``scaled`` holding
    ``copies`` copies of out * scale rounded as that torch op rounds, and the step index one further; also when
    the model output is the input buffer itself (cond aliases scaled) and through the unprepared fallback."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(copies * 10 + DTYPES.index(dtype))
    shape = (2, 3, 5, 7)
    for uncond, slots, n_out, n_noise in CONFIGS[:3]:
        case = make_case(shape, dtype, dtype, uncond, slots, n_out, n_noise, gen, step=1)
        scale = float(torch.rand((), generator=gen)) + 0.25
        expected_out, expected_hist = run(case, "reference")
        expected_scaled = torch.cat([expected_out * scale] * copies)
        for cond_is_input in (False, True):
            c = case.to(device).clone()
            scaled = torch.full((copies * shape[0], *shape[1:]), math.nan, dtype=dtype, device=device)
            if cond_is_input:  # the model returned its input: the buffer the step rewrites
                scaled[: shape[0]].copy_(c.cond)
                c.cond = scaled[: shape[0]]
            prepared = PreparedStep(*c.args(), c.x, backend=backend)
            out = prepared(c.x, c.cond, c.uncond, c.x, scaled, scale, advance=True)
            assert out is c.x and int(c.step) == 2
            assert_bitwise(out.cpu(), expected_out)
            assert_bitwise(scaled.cpu(), expected_scaled)
            if expected_hist is not None:
                assert_bitwise(c.history.cpu(), expected_hist)
        # a layout the step was not prepared for (non-contiguous cond) runs the checked path, same results
        c = case.to(device).clone()
        prepared = PreparedStep(*c.args(), c.x, backend=backend)
        cond = c.cond.transpose(-1, -2).contiguous().transpose(-1, -2)
        scaled = torch.full((copies * shape[0], *shape[1:]), math.nan, dtype=dtype, device=device)
        prepared(c.x, cond, c.uncond, c.x, scaled, scale, advance=True)
        assert int(c.step) == 2
        assert_bitwise(c.x.cpu(), expected_out)
        assert_bitwise(scaled.cpu(), expected_scaled)


def test_prepared_step_refuses_a_scaled_buffer_of_partial_copies():
    case = _base_case()
    prepared = PreparedStep(*case.args(), case.x.clone(), backend="cpu")
    bad = torch.empty(case.x.numel() + 1, dtype=case.x.dtype)
    with pytest.raises(ValueError, match="it must hold whole copies of x"):
        prepared(case.x, case.cond, case.uncond, case.x.clone(), bad, 2.0)
