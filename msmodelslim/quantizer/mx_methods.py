"""Choices of the MX shared exponent for weights, beyond the OCP rule (the established tool's MX methods).

The OCP rule takes e = floor(log2 amax) - emax_elem: the block's largest value lands in [2^emax, 2^(emax+1)),
partly above the largest element (448 for E4M3, 6 for E2M1), where it saturates. The methods trade that
clipping against a coarser grid:

- `mse_round` (MXFP8): per block, e_down = floor(log2 amax) - emax (the OCP exponent) or e_up = ceil(log2 amax)
  - emax (one larger unless amax is a power of two: nothing clips, the step doubles); the one whose block
  squared error is smaller wins (a tie keeps e_down).
- `ceil_x` (MXFP4): e = ceil(log2(amax / c + 9.6e-7)), so the block's largest value scales into (c/2, c]; with
  the default c = 7.25 little clips above 6 and the grid stays fine. `enable_search` picks, per weight, the c
  in [search_min, search_max] (step search_step) with the smallest squared error; the first of equal ones wins.

Elements are then rounded to nearest-even on the element grid and saturated, as for minmax
(quantizer/float_formats.py).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.float_formats import ELEMENTS, MX_BLOCK, mx_dequantize, mx_quantize, to_blocks

CEIL_X_EPSILON = 9.6e-7  # keeps log2 finite for an all-zero block (the established value)


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    return to_blocks(w.detach().float(), MX_BLOCK).abs().amax(dim=-1)


def _block_error(w: torch.Tensor, element: str, exponent: torch.Tensor) -> torch.Tensor:
    """Squared error of each block [..., K/32] with these exponents."""
    w = w.detach().float()
    approx = mx_dequantize(*mx_quantize(w, element, exponent=exponent))
    return to_blocks((w - approx) ** 2, MX_BLOCK).sum(dim=-1)


def mse_round_exponent(w: torch.Tensor, element: str = "fp8_e4m3") -> torch.Tensor:
    """Per block the exponent, floor or ceil of log2 amax minus emax, with the smaller squared error."""
    emax = ELEMENTS[element][2]
    log2_amax = torch.log2(_block_amax(w).double())  # double: floor/ceil of an exact power of two stay equal
    finite = torch.isfinite(log2_amax)
    down = torch.where(finite, torch.floor(log2_amax), torch.full_like(log2_amax, -127.0 + emax)).int() - emax
    up = torch.where(finite, torch.ceil(log2_amax), torch.full_like(log2_amax, -127.0 + emax)).int() - emax
    return torch.where(_block_error(w, element, up) < _block_error(w, element, down), up, down)


def ceil_x_exponent(w: torch.Tensor, ceil_x_value: float) -> torch.Tensor:
    """e = ceil(log2(amax / c + 9.6e-7)) per block."""
    return torch.ceil(torch.log2(_block_amax(w).double() / ceil_x_value + CEIL_X_EPSILON)).int()


def ceil_x_search(w: torch.Tensor, low: float, high: float, step: float) -> float:
    """The divisor c in [low, high] (every `step`) whose exponents give the weight the smallest squared error."""
    count = int(round((high - low) / step)) + 1
    best, best_error = low, float("inf")
    for value in (low + i * step for i in range(count)):
        error = float(_block_error(w, "fp4_e2m1", ceil_x_exponent(w, value)).sum())
        if error < best_error:
            best, best_error = value, error
    return best
