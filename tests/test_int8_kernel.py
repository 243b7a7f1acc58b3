"""INT8: quantization round trips, and the INT8 linear (Triton, interpreted on CPU; torch._int_mm) vs
the integer reference: the int32 accumulator exactly, the epilogue to fp32 rounding."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from diffrt.kernels import registry
from diffrt.kernels.int8_launch import int8_linear
from diffrt.kernels.int8_spec import dynamic_row_scale, int8_linear_reference, quantize, quantize_weight

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = [(45, 70, 33), (1, 16, 16), (130, 96, 50)]  # (M, K, N): odd sizes, one row, several tiles


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _case(m, k, n, dtype, device, key):
    gen = _gen(key)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(device, dtype)
    w_q, w_scale = quantize_weight(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen)
    return x, w_q.to(device), w_scale.to(device), dynamic_row_scale(x), bias.to(device)


def test_quantize_rounds_half_to_even_and_clamps():
    scale = torch.tensor([1.0])
    values = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.6, 200.0, -300.0, 0.49])
    assert quantize(values, scale).tolist() == [0, 2, 2, 0, -2, 127, 127, -127, 0]


def test_weight_round_trip_error_is_half_a_step():
    w = torch.randn(20, 64, generator=_gen("w"))
    w[3] = 0.0
    w_q, scale = quantize_weight(w)
    assert w_q.dtype == torch.int8 and scale.shape == (20,) and scale[3] == 1.0 and not w_q[3].any()
    assert w_q.abs().max() == 127
    error = (w_q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_dynamic_row_scale_is_row_max_over_127():
    x = torch.tensor([[1.0, -254.0], [0.0, 0.0]])
    assert dynamic_row_scale(x).tolist() == [2.0, 1.0]
    assert dynamic_row_scale(x, torch.tensor([0.5, 0.5])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_accumulator_is_exact(device, backend, dtype, shape):
    m, k, n = shape
    x, w_q, w_scale, row_scale, _ = _case(m, k, n, torch.float32, device, ("acc", shape))
    if dtype == torch.int8:
        x = quantize(x, row_scale[:, None])
    else:
        x = x.to(dtype)
        row_scale = dynamic_row_scale(x)
    smooth = None if dtype == torch.int8 else (torch.rand(k, generator=_gen("smooth")) + 0.5).to(device)
    acc = int8_linear(x, w_q, w_scale, row_scale, inv_smooth=smooth, out_dtype=torch.int32, backend=backend)
    expected = int8_linear_reference(x.cpu(), w_q.cpu(), w_scale.cpu(), row_scale.cpu(),
                                     inv_smooth=None if smooth is None else smooth.cpu(), out_dtype=torch.int32)
    assert acc.dtype == torch.int32 and torch.equal(acc.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_epilogue_matches_the_reference(device, backend, activation, dtype):
    x, w_q, w_scale, row_scale, bias = _case(45, 70, 33, dtype, device, ("epilogue", dtype))
    out = int8_linear(x, w_q, w_scale, row_scale, bias, activation, backend=backend)
    expected = int8_linear_reference(x.cpu(), w_q.cpu(), w_scale.cpu(), row_scale.cpu(), bias.cpu(), activation)
    assert out.dtype == dtype and out.shape == (45, 33)
    tolerance = {torch.float32: 2e-6, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
def test_bf16_output_on_cuda():
    x, w_q, w_scale, row_scale, bias = _case(130, 96, 50, torch.bfloat16, "cuda", "bf16")
    out = int8_linear(x, w_q, w_scale, row_scale, bias, "gelu", backend="triton")
    expected = int8_linear_reference(x.cpu(), w_q.cpu(), w_scale.cpu(), row_scale.cpu(), bias.cpu(), "gelu")
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_int8_linear_approximates_the_float_linear():
    """Rounding both operands to 8 bits: the result is close to F.linear, within the quantization steps."""
    gen = _gen("float")
    x, w, bias = torch.randn(64, 128, generator=gen), torch.randn(48, 128, generator=gen), torch.randn(48, generator=gen)
    w_q, w_scale = quantize_weight(w)
    out = int8_linear(x, w_q, w_scale, dynamic_row_scale(x), bias)
    exact = F.linear(x, w, bias)
    relative = (out - exact).norm() / exact.norm()
    assert 1e-4 < relative < 0.02, relative


def test_bad_inputs_raise():
    x, w_q, w_scale, row_scale, bias = _case(8, 16, 4, torch.float32, "cpu", "bad")
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and w_q \[N, K\]"):
        int8_linear(x[:, :8], w_q, w_scale, row_scale)
    with pytest.raises(TypeError, match="w_q must be int8"):
        int8_linear(x, w_q.float(), w_scale, row_scale)
    with pytest.raises(ValueError, match=r"row_scale must be \[8\]"):
        int8_linear(x, w_q, w_scale, row_scale[:3])
    with pytest.raises(TypeError, match="row_scale must be float32"):
        int8_linear(x, w_q, w_scale, row_scale.double())
    with pytest.raises(ValueError, match="activation must be one of"):
        int8_linear(x, w_q, w_scale, row_scale, activation="relu6")
    lines = registry.explain("int8_linear", x, w_q, w_scale, row_scale)
    assert any(line.strip().startswith("torch: chosen") for line in lines)
