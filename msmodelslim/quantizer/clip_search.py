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


def best_shrunk_range(values: torch.Tensor, ratios: list[float], bits: int, symmetric: bool,
                      norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [...], offset [...]) for values [..., n]: of the ranges r·[min, max], r in `ratios` (in order; the
    first of equal ones wins), the one with the smallest Σ |v − Q(v)|^norm along the last axis."""
    qmin, qmax = int_range(bits)
    lo, hi = values.amin(dim=-1), values.amax(dim=-1)
    best_error = torch.full_like(lo, float("inf"))
    best_scale, best_offset = torch.zeros_like(lo), torch.zeros_like(lo)
    for r in ratios:
        scale, offset = scale_offset_from_minmax(r * lo, r * hi, bits, symmetric)
        codes = (torch.round(values / scale.unsqueeze(-1)) + offset.unsqueeze(-1)).clamp(qmin, qmax)
        error = ((codes - offset.unsqueeze(-1)) * scale.unsqueeze(-1) - values).abs().pow(norm).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def clip_search_range(columns: torch.Tensor, bits: int, symmetric: bool, grid: int = GRID,
                      max_shrink: float = MAX_SHRINK, norm: float = NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [rows], offset [rows]) for the columns [rows, n] of one group; p = 1 (plain min/max) wins ties."""
    ratios = [1 - i / grid for i in range(int(max_shrink * grid))]
    return best_shrunk_range(columns.float(), ratios, bits, symmetric, norm)
