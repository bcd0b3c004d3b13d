"""`fouroversix`: MXFP4 weights with an adaptive block scale, scale-to-6 or scale-to-4, whichever errs less.

Paper: "Four Over Six: More Accurate NVFP4 Quantization with Adaptive Block Scaling" (2025, arXiv 2512.02010).
With a fine-grained block scale, mapping a block's largest value to 6 (the E2M1 maximum) spends the top of the
grid on one outlier, while mapping it to 4 leaves 4..6 unused but puts the mid-sized values on the finer part of
the grid. Per block, both are tried and the one with the smaller squared error is kept.

MXFP4's block scale is E8M0 (a power of two), so "map amax to t" cannot be exact. The established tool rounds
log2(amax / t) to the nearest integer (in the log domain), ties (fraction within 1e-6 of 0.5) going to the odd
exponent (its "banker's rounding": an even integer part rounds up), and an all-zero block gets exponent 0:

    e_t = round_log2(amax / t),  t in {6, 4}

log2(6/4) = 0.585 < 1, so e_4 is e_6 or e_6 + 1: with E8M0 scales fouroversix chooses, per block, between the
scale-to-6 exponent and the next larger one (scale-to-6 itself maps amax into [6/√2, 6·√2) and clips what lands
above 6).
Elements round to nearest-even on the E2M1 grid and saturate, as everywhere in quantizer/float_formats.py (the
established tool rounds half away from zero; ties are measure-zero for real weights). A tie in block error keeps
scale-to-6.
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.float_formats import MX_BLOCK, mx_dequantize, mx_quantize, to_blocks

SCALE_TARGETS = (6.0, 4.0)  # the block max lands near 6 (the E2M1 maximum) or near 4
TIE_TOLERANCE = 1e-6  # |fraction of log2 - 0.5| within this is a tie (the established tolerance)


def nearest_power_of_two_exponent(scale: torch.Tensor) -> torch.Tensor:
    """round(log2 scale) per element (int32), ties to the odd exponent; scale <= 0 (an all-zero block) gives 0.

    log2 is taken in float64 of the float32 scale, so that exact powers of two and halves stay exact."""
    scale = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32)).double()
    log2 = torch.log2(scale)
    whole = torch.floor(log2)
    fraction = log2 - whole
    tie = (fraction - 0.5).abs() <= TIE_TOLERANCE
    up = torch.where(tie, torch.remainder(whole, 2) == 0, fraction > 0.5)  # a tie rounds an even integer part up
    return (whole + up.double()).to(torch.int32)


def _block_squared_error(w: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    approx = mx_dequantize(*mx_quantize(w, "fp4_e2m1", exponent=exponent))
    return to_blocks((w - approx) ** 2, MX_BLOCK).sum(dim=-1)


def fouroversix_exponent(w: torch.Tensor) -> torch.Tensor:
    """Per block of 32 along the last axis, the E8M0 exponent [..., K/32] of scale-to-6 or scale-to-4, whichever
    gives the block the smaller squared error (a tie keeps scale-to-6)."""
    w = w.detach().float()
    amax = to_blocks(w, MX_BLOCK).abs().amax(dim=-1)
    to_six, to_four = (nearest_power_of_two_exponent(amax / target) for target in SCALE_TARGETS)
    four_wins = _block_squared_error(w, to_four) < _block_squared_error(w, to_six)
    return torch.where(four_wins, to_four, to_six)
