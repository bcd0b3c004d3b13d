"""Element formats (FP8 E4M3, FP4 E2M1) and the MX shared exponent against slow scalar references written from
the OCP specs: every code of both formats is decoded by hand, and rounding is checked on every code's value,
every midpoint between neighbours (the ties), points just beside them, and values past the largest one."""
from __future__ import annotations

import math
import random

import pytest
import torch

from msmodelslim.quantizer.float_formats import (decode_fp4_e2m1, e8m0_to_scale, encode_fp4_e2m1, mx_quantize,
                                                 pack_fp4_pairs, round_fp4_e2m1, round_fp8_e4m3, scale_to_e8m0,
                                                 shared_exponent, to_fp8_e4m3, unpack_fp4_pairs)


# ---- scalar references --------------------------------------------------------------------------------------
def e4m3_value(code: int) -> float:
    """OCP E4M3 (fn): bias 7, no infinities; S.1111.111 is NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e2m1_value(code: int) -> float:
    """OCP E2M1: bias 1, exponent 0 is subnormal (0 or 0.5)."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def round_scalar(x: float, codes: dict[int, float]) -> float:
    """Nearest representable value; a tie goes to the code whose mantissa's last bit is 0; past the largest
    value, the largest (saturation)."""
    finite = {c: v for c, v in codes.items() if not math.isnan(v)}
    top = max(finite.values())
    if abs(x) >= top:
        return math.copysign(top, x)
    best = min(finite.items(), key=lambda cv: (abs(cv[1] - x), cv[0] & 1, cv[0]))
    return best[1] if best[1] != 0 else 0.0


E4M3 = {c: e4m3_value(c) for c in range(256)}
E2M1 = {c: e2m1_value(c) for c in range(16)}


def probes(codes: dict[int, float]) -> list[float]:
    values = sorted({v for v in codes.values() if not math.isnan(v)})
    out = list(values)
    for a, b in zip(values, values[1:]):
        mid = (a + b) / 2
        out += [mid, math.nextafter(mid, -math.inf), math.nextafter(mid, math.inf)]
    top = values[-1]
    out += [top * 1.01, top * 1.0625, top * 1.2, top * 100, -top * 3, 1e-12, -1e-12]
    return out


# ---- tests --------------------------------------------------------------------------------------------------
def test_every_e4m3_code_decodes_as_the_spec_says():
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    for code, value in enumerate(decoded):
        expected = E4M3[code]
        assert (math.isnan(value) and math.isnan(expected)) or value == expected, code


def test_e4m3_rounding_matches_the_scalar_reference():
    xs = probes(E4M3)
    got = round_fp8_e4m3(torch.tensor(xs, dtype=torch.float64).float()).tolist()
    for x, g in zip(torch.tensor(xs).float().tolist(), got):
        assert g == round_scalar(x, E4M3), x
    assert not bool(torch.isnan(to_fp8_e4m3(torch.tensor([1e30, -1e30, 449.0])).float()).any())


def test_every_e2m1_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_fp4_e2m1(codes)
    assert values.tolist() == [E2M1[c] for c in range(16)]
    # -0 (code 8) is encoded as +0; every other code comes back
    assert encode_fp4_e2m1(values).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]


def test_e2m1_rounding_matches_the_scalar_reference():
    xs = probes(E2M1)
    got = round_fp4_e2m1(torch.tensor(xs).float()).tolist()
    for x, g in zip(torch.tensor(xs).float().tolist(), got):
        assert g == round_scalar(x, E2M1), x


def test_fp4_nibble_order():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = pack_fp4_pairs(codes)
    assert packed.tolist() == [[0x21, 0x8F]]  # element 2j in the low nibble
    assert torch.equal(unpack_fp4_pairs(packed), codes)


def mx_scalar(block: list[float], element_max_exp: int, codes: dict[int, float]) -> tuple[int, list[float]]:
    """OCP MX: X = 2^(floor(log2(amax)) - emax_elem), elements = round(x / X), saturated."""
    amax = max(abs(v) for v in block)
    if amax == 0:
        e = -127
    else:
        e = math.frexp(amax)[1] - 1 - element_max_exp
        e = max(-127, min(127, e))
    return e, [round_scalar(v / 2.0 ** e, codes) for v in block]


@pytest.mark.parametrize("element,emax,codes", [("fp8_e4m3", 8, E4M3), ("fp4_e2m1", 2, E2M1)])
def test_mx_blocks_match_the_scalar_reference(element, emax, codes):
    rng = random.Random(0)
    rows = []
    for r in range(12):
        magnitude = 10.0 ** rng.uniform(-6, 4)
        row = [rng.gauss(0, magnitude) for _ in range(64)]
        if r == 0:
            row[:32] = [0.0] * 32  # an all-zero block
        if r == 1:
            row[5] = 2.0 ** 7  # amax exactly a power of two
        rows.append(row)
    x = torch.tensor(rows, dtype=torch.float32)
    elements, scale = mx_quantize(x, element)
    for i, row in enumerate(x.tolist()):
        for b in range(2):
            e, expected = mx_scalar(row[32 * b: 32 * b + 32], emax, codes)
            assert scale[i, b].item() == 2.0 ** e
            assert elements[i, 32 * b: 32 * b + 32].tolist() == expected


def test_e8m0_bytes():
    e = torch.tensor([-127, -1, 0, 5, 127])
    scale = torch.ldexp(torch.ones(5), e)
    byte = scale_to_e8m0(scale)
    assert byte.tolist() == [0, 126, 127, 132, 254]
    assert torch.equal(e8m0_to_scale(byte), scale)
    assert shared_exponent(torch.tensor([448.0, 255.9, 512.0, 0.0, 1e-45]), 8).tolist() == [0, -1, 1, -127, -127]
    with pytest.raises(ValueError, match="powers of two"):
        scale_to_e8m0(torch.tensor([3.0]))


# ---- MX weight methods (quantizer/mx_methods.py) ------------------------------------------------------------
def _sample_weight(rows: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 64, generator=g) * torch.logspace(-3, 1, rows)[:, None]
    w[0, :32] = 0.0  # an all-zero block
    w[1, 3] = 4.0  # a block whose amax is a power of two
    return w


def _block_sse(block: list[float], e: int, codes: dict[int, float]) -> float:
    return sum((v - round_scalar(v / 2.0 ** e, codes) * 2.0 ** e) ** 2 for v in block)


def test_mse_round_matches_the_scalar_reference():
    from msmodelslim.quantizer.float_formats import quantize_weight_float
    from msmodelslim.quantizer.mx_methods import mse_round_exponent

    w = _sample_weight()
    codes, scale, _ = quantize_weight_float(w, "mxfp8", mse_round_exponent(w))
    chose_up = 0
    for i, row in enumerate(w.tolist()):
        for b in range(2):
            block = row[32 * b: 32 * b + 32]
            amax = max(abs(v) for v in block)
            if amax == 0:
                e = -127
            else:
                down = math.floor(math.log2(amax)) - 8
                up = math.ceil(math.log2(amax)) - 8
                e = up if _block_sse(block, up, E4M3) < _block_sse(block, down, E4M3) else down
                chose_up += e == up != down
            assert scale[i, b].item() == 2.0 ** e, (i, b)
            assert codes[i, 32 * b: 32 * b + 32].float().tolist() == [round_scalar(v / 2.0 ** e, E4M3) for v in block]
    assert chose_up > 0  # the sample exercises both choices


@pytest.mark.parametrize("c", [6.0, 7.25, 12.0])
def test_ceil_x_matches_the_scalar_reference(c):
    from msmodelslim.quantizer.float_formats import decode_fp4_e2m1, quantize_weight_float
    from msmodelslim.quantizer.mx_methods import ceil_x_exponent

    w = _sample_weight()
    codes, scale, _ = quantize_weight_float(w, "mxfp4", ceil_x_exponent(w, c))
    for i, row in enumerate(w.tolist()):
        for b in range(2):
            block = row[32 * b: 32 * b + 32]
            e = math.ceil(math.log2(max(abs(v) for v in block) / c + 9.6e-7))
            assert scale[i, b].item() == 2.0 ** e, (i, b)
            if max(abs(v) for v in block) > 0:
                assert c / 2 < max(abs(v) for v in block) / 2.0 ** e <= c  # the block's top lands in (c/2, c]
            values = decode_fp4_e2m1(codes[i, 32 * b: 32 * b + 32]).tolist()
            assert values == [round_scalar(v / 2.0 ** e, E2M1) for v in block]


def test_ceil_x_search_picks_the_smallest_error():
    from msmodelslim.quantizer.float_formats import code_values, quantize_weight_float
    from msmodelslim.quantizer.mx_methods import ceil_x_exponent, ceil_x_search
    from msmodelslim.quantizer.primitives import dequantize_weight

    w = _sample_weight(seed=3)

    def error(c: float) -> float:
        codes, scale, offset = quantize_weight_float(w, "mxfp4", ceil_x_exponent(w, c))
        return float(((dequantize_weight(code_values(codes), scale, offset) - w) ** 2).sum())

    errors = {6.0 + 0.5 * i: error(6.0 + 0.5 * i) for i in range(13)}
    assert ceil_x_search(w, 6.0, 12.0, 0.5) == min(errors, key=errors.get)
    minmax = quantize_weight_float(w, "mxfp4")
    assert min(errors.values()) < float(((dequantize_weight(code_values(minmax[0]), minmax[1], minmax[2]) - w) ** 2).sum())


@pytest.mark.parametrize("weight,needle", [
    ({"dtype": "mxfp8", "scope": "per_block", "method": "ceil_x"}, "takes method minmax or mse_round"),
    ({"dtype": "mxfp4", "scope": "per_block", "method": "mse_round"}, "takes method minmax or ceil_x"),
    ({"dtype": "int8", "scope": "per_channel", "method": "ceil_x"}, "takes dtype mxfp4"),
    ({"dtype": "mxfp4", "scope": "per_block", "method": "ceil_x", "ext": {"ceil_x_value": 13}}, "from 6.0 to 12.0"),
    ({"dtype": "mxfp4", "scope": "per_block", "method": "ceil_x",
      "ext": {"enable_search": True, "search_min": 9, "search_max": 8}}, "must be greater than"),
])
def test_mx_method_configs_are_checked(weight, needle):
    from msmodelslim.quantizer.scheme import LinearQConfig

    with pytest.raises(ValueError, match=needle):
        LinearQConfig(weight=weight)
