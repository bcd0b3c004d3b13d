"""fouroversix (MXFP4, scale-to-6 or scale-to-4 per block) against a slow scalar reference that brute-forces both
choices block by block, with its own E2M1 grid and its own nearest-power-of-two rule."""
from __future__ import annotations

import math

import torch

from msmodelslim.quantizer.float_formats import decode_fp4_e2m1, quantize_weight_float
from msmodelslim.quantizer.fouroversix import fouroversix_exponent, nearest_power_of_two_exponent

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes; the index parity is the mantissa bit


def round_e2m1(x: float) -> float:
    """Nearest E2M1 value, a tie to the even mantissa (even index), saturating at ±6."""
    magnitude = min(abs(x), 6.0)
    index = min(range(len(GRID)), key=lambda i: (abs(GRID[i] - magnitude), i % 2))
    return math.copysign(GRID[index], x) if GRID[index] else 0.0


def nearest_exponent(scale: float) -> int:
    """round(log2 scale); a fraction within 1e-6 of one half goes to the odd exponent; scale 0 -> 0."""
    if scale <= 0:
        return 0
    log2 = math.log2(scale)
    whole = math.floor(log2)
    fraction = log2 - whole
    if abs(fraction - 0.5) <= 1e-6:
        return whole + 1 if whole % 2 == 0 else whole
    return whole + 1 if fraction > 0.5 else whole


def reference_block(block: list[float]) -> tuple[int, list[float]]:
    """(exponent, element values) of the cheaper of scale-to-6 and scale-to-4 (scale-to-6 on a tie)."""
    amax = max(abs(v) for v in block)
    best = None
    for target in (6.0, 4.0):
        e = nearest_exponent(float(torch.tensor(amax, dtype=torch.float32) / target))  # the scale in float32
        elements = [round_e2m1(v / 2.0 ** e) for v in block]
        error = sum((v - q * 2.0 ** e) ** 2 for v, q in zip(block, elements))
        if best is None or error < best[0]:
            best = (error, e, elements)
    return best[1], best[2]


def test_nearest_exponent_rounds_in_the_log_domain_with_ties_to_odd():
    scales = torch.tensor([1.0, 1.4, 1.5, 2 ** 0.5, 2 ** 1.5, 2 ** -2.5, 0.0, 3.0, 2.9, 2 ** -126])
    assert nearest_power_of_two_exponent(scales).tolist() == [nearest_exponent(float(s)) for s in scales.tolist()]
    assert nearest_power_of_two_exponent(torch.tensor([2 ** 0.5, 2 ** 1.5])).tolist() == [1, 1]


def test_fouroversix_matches_the_block_by_block_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 512, generator=g) * torch.logspace(-3, 1, 48).unsqueeze(1)
    w[0, :32] = 0  # an all-zero block
    w[1, 32:64] = torch.linspace(-1, 1, 32)  # values on both sides of the grid's ties
    w[2, 64:96] *= torch.where(torch.arange(32) == 5, 40.0, 1.0)  # one outlier in the block
    codes, scale, _ = quantize_weight_float(w, "mxfp4", fouroversix_exponent(w))
    elements = decode_fp4_e2m1(codes)
    chose_four = chose_six = 0
    for n in range(w.shape[0]):
        for b in range(w.shape[1] // 32):
            block = w[n, 32 * b:32 * (b + 1)].tolist()
            e, expected = reference_block(block)
            assert scale[n, b].item() == 2.0 ** e, (n, b)
            assert elements[n, 32 * b:32 * (b + 1)].tolist() == expected, (n, b)
            amax = max(abs(v) for v in block)
            six = nearest_exponent(float(torch.tensor(amax, dtype=torch.float32) / 6.0))
            chose_six += e == six
            chose_four += e != six
    assert chose_four > 0 and chose_six > 0  # both choices are exercised


def test_fouroversix_error_is_never_above_either_choice():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))

    def error(exponent):
        codes, scale, _ = quantize_weight_float(w, "mxfp4", exponent)
        approx = decode_fp4_e2m1(codes).reshape(64, -1, 32) * scale.unsqueeze(-1)
        return ((w.reshape(64, -1, 32) - approx) ** 2).sum(-1)

    amax = w.reshape(64, -1, 32).abs().amax(-1)
    chosen = error(fouroversix_exponent(w))
    for target in (6.0, 4.0):
        assert bool((chosen <= error(nearest_power_of_two_exponent(amax / target))).all())
