"""Weight ranges shrunk by a grid search, the `mse` option of the GPTQ authors' quantizer (Frantar et al.,
"GPTQ", ICLR 2023, reference code), which QuaRot (Ashkboos et al., 2024) applies to its W4 weights.

A min/max range spends grid points on a row's few largest weights; shrinking it clips them and refines the grid
for the rest. Per row (of a group of columns), try the ranges p·[min, max] for p = 1, 1 − 1/grid, …,
1 − (⌈max_shrink·grid⌉ − 1)/grid and keep the one with the smallest Σ |w − Q(w)|^norm (norm 2.4 as in that code:
between squared error and max error, it weighs the clipped large weights more than squared error does).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.primitives import int_range, scale_offset_from_minmax

GRID = 100
MAX_SHRINK = 0.8
NORM = 2.4


def clip_search_range(columns: torch.Tensor, bits: int, symmetric: bool, grid: int = GRID,
                      max_shrink: float = MAX_SHRINK, norm: float = NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [rows], offset [rows]) for the columns [rows, n] of one group; p = 1 (plain min/max) wins ties."""
    columns = columns.float()
    qmin, qmax = int_range(bits)
    lo, hi = columns.amin(dim=1), columns.amax(dim=1)
    best_error = torch.full_like(lo, float("inf"))
    best_scale, best_offset = torch.zeros_like(lo), torch.zeros_like(lo)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, offset = scale_offset_from_minmax(p * lo, p * hi, bits, symmetric)
        codes = (torch.round(columns / scale[:, None]) + offset[:, None]).clamp(qmin, qmax)
        error = ((codes - offset[:, None]) * scale[:, None] - columns).abs().pow(norm).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset
