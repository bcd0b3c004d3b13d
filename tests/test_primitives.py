"""Quantizer maths against slow, obviously-correct element-by-element references."""
import math

import pytest
import torch

from msmodelslim.quantizer.primitives import (
    dequantize_weight, fake_quantize, int_range, quantize_per_token_dynamic, quantize_weight_minmax,
    scale_offset_from_minmax,
)


def slow_rtn_row(values: list[float], bits: int, symmetric: bool) -> tuple[list[int], float, float]:
    """One row (or group), scalar Python: the textbook min/max round-to-nearest."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    if symmetric:
        scale = max(max(-lo, hi) / qmax, torch.finfo(torch.float32).tiny)
        offset = 0.0
    else:
        scale = max((hi - lo) / (qmax - qmin), torch.finfo(torch.float32).tiny)
        offset = min(max(qmin - round(lo / scale), qmin), qmax)
    codes = [int(min(max(round(v / scale) + offset, qmin), qmax)) for v in values]
    return codes, scale, offset


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_weight_rtn_matches_slow_reference(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(6, 32, dtype=torch.float64).float() * 0.1
    w[2, 5] = 3.0  # an outlier: its group gets a coarse grid, others must not
    q, scale, offset = quantize_weight_minmax(w, bits, symmetric, group_size)
    size = group_size or 32
    for n in range(6):
        for g in range(32 // size):
            row = w[n, g * size : (g + 1) * size].tolist()
            codes, s, o = slow_rtn_row(row, bits, symmetric)
            assert q[n, g * size : (g + 1) * size].tolist() == codes
            assert math.isclose(scale[n, g].item(), s, rel_tol=1e-6)
            assert offset[n, g].item() == o
    # The dequantized error of each element is at most half a step.
    err = (dequantize_weight(q, scale, offset) - w).abs()
    step = scale.repeat_interleave(size, dim=1)
    assert bool((err <= step / 2 + 1e-6).all())


def test_python_round_is_half_to_even_like_torch():
    # Both the reference and the kernels use round-half-to-even; make that assumption explicit.
    assert [round(x) for x in (0.5, 1.5, 2.5, -0.5)] == torch.round(torch.tensor([0.5, 1.5, 2.5, -0.5])).tolist()


def test_symmetric_int8_range_and_zero():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    q, scale, offset = quantize_weight_minmax(w, 8, True)
    assert q.tolist() == [[-127, 0, 64, 127]]
    assert offset.item() == 0 and math.isclose(scale.item(), 1 / 127, rel_tol=1e-6)


def test_asymmetric_act_params_cover_range_exactly():
    lo, hi = torch.tensor(-0.5), torch.tensor(3.0)
    scale, offset = scale_offset_from_minmax(lo, hi, 8, symmetric=False)
    qmin, qmax = int_range(8)
    assert math.isclose(scale.item(), 3.5 / 255, rel_tol=1e-6)
    x = torch.tensor([-0.5, 0.0, 3.0])
    y = fake_quantize(x, scale, offset, 8)
    assert y[1].item() == 0.0  # zero is exactly representable
    assert torch.allclose(y, x, atol=scale.item() / 2 + 1e-7)


def test_all_zero_weights_do_not_divide_by_zero():
    q, scale, offset = quantize_weight_minmax(torch.zeros(3, 8), 8, True)
    assert bool((q == 0).all()) and bool((scale > 0).all())


def test_per_token_dynamic_matches_slow_reference():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    y = quantize_per_token_dynamic(x, 8)
    for i in range(3):
        for t in range(5):
            row = x[i, t].tolist()
            s = max(abs(v) for v in row) / 127
            expected = [min(max(round(v / s), -128), 127) * s for v in row]
            assert torch.allclose(y[i, t], torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("bits,dtype", [(8, torch.float32), (4, torch.float32), (8, torch.bfloat16)])
def test_per_token_dynamic_equals_the_general_fake_quantizer_bit_for_bit(bits, dtype):
    """The three-pass per-token quantizer gives exactly what quantize -> int8 -> dequantize gives (the read-back of
    every dynamic layer relies on it): tokens with exact half steps, an all-zero token, wide magnitudes."""
    torch.manual_seed(2)
    x = torch.randn(4, 7, 96) * torch.logspace(-3, 3, 7).reshape(1, 7, 1)
    qmax = 2 ** (bits - 1) - 1
    x[0, 0] = torch.arange(96) * 0.5 - 24  # max 23.5: s = 23.5/qmax; steps land on exact halves
    x[1, 1] = 0.0
    x = x.to(dtype)
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    want = fake_quantize(x, scale, torch.zeros_like(scale), bits)
    got = quantize_per_token_dynamic(x, bits)
    assert got.dtype == dtype and torch.equal(got, want)


def test_per_token_dynamic_passes_the_same_gradient_as_the_general_fake_quantizer():
    """Calibration backpropagates through activation fake-quantization (learned rounding): the in-place steps of
    the fast path must keep autograd working and give fake_quantize's gradient."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    quantize_per_token_dynamic(x, 8).pow(2).sum().backward()
    fast, x.grad = x.grad.clone(), None
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    fake_quantize(x, scale, torch.zeros_like(scale), 8).pow(2).sum().backward()
    assert torch.equal(fast, x.grad) and bool(x.grad.abs().sum() > 0)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight_minmax(torch.zeros(2, 576), 4, True, 128)


def test_static_input_is_quantized_as_the_kernel_adds_the_offset_before_rounding():
    """formats.md A.4.1: x_q = sat_int8(round(x * (1/s) + o)). With half-to-even rounding and an odd offset, a value
    on an exact half step rounds differently from round(x/s) + o: the read-back must follow the kernel."""
    from decimal import ROUND_HALF_EVEN, Decimal

    from msmodelslim.quantizer.primitives import fake_quantize_input

    scale, offset = torch.tensor([0.5]), torch.tensor([3.0])
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 60.0, -70.0, 0.1, -0.3])  # x/s = 0.5, 1.5, -0.5, 2.5 (half steps)

    def slow(value: float) -> float:
        exact = Decimal(value) * (Decimal(1) / Decimal(0.5)) + Decimal(3)
        q = max(-128, min(127, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))))
        return (q - 3) * 0.5

    assert fake_quantize_input(x, scale, offset, 8).tolist() == [slow(v) for v in x.tolist()]
    # the other order of operations gives another answer on half steps (round(0.5) + 3 = 3, round(3.5) = 4)
    assert fake_quantize(x[:1], scale, offset, 8).item() != fake_quantize_input(x[:1], scale, offset, 8).item()
