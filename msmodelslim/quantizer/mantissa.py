"""Short-mantissa rounding of float16 weights, the step the established tool's `float_sparse` applies after ADMM
pruning (its "L2 quantization"): fewer distinct bit patterns let the Atlas 300I (310P) weight compression
unit, which turns W16A16S into W16A16SC, compress further. No paper; the rule, written out:

Take each weight as float16, |w| = m·2^e with m ∈ [1, 2) (e the unbiased exponent), then
- e ≥ −8:            m is rounded to `mantissa_bits` fraction bits (half to even): m ∈ {1, 1.25, …, 2} for 2 bits;
- −14 ≤ e ≤ −9:      m becomes 1, or 2 when m > 1.5 (a power of two);
- subnormal (|w| < 2^−14): 0.
A weight in `keep` keeps its float16 value, except in the −14…−9 band, where the power-of-two rule wins
(the established order of operations). `keep_mask` picks the weights to keep: the `proportion` whose rounding
error |w − round(w)|, weighted by the input's root mean square √diag(XᵀX), is largest (ties kept too).
Zeros stay zero, so the sparsity of the pruned weight is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

MANTISSA_BITS = 2
KEEP_PROPORTION = 0.02
SUBNORMAL_EXPONENT = -14  # float16's smallest normal exponent
POWER_OF_TWO_BELOW = -8  # exponents under this (down to -14) round to a power of two


@torch.no_grad()
def round_mantissa(w: torch.Tensor, keep: Optional[torch.Tensor] = None,
                   mantissa_bits: int = MANTISSA_BITS) -> torch.Tensor:
    """The rounded weights (float32 tensor of float16-representable values)."""
    half = w.detach().to(torch.float16).float()
    m, e = torch.frexp(half.abs())  # |w| = m·2^e, m ∈ [0.5, 1)
    m, e = m * 2, e - 1  # m ∈ [1, 2)
    step = 2.0 ** mantissa_bits
    rounded = torch.round(m * step) / step
    if keep is not None:
        rounded = torch.where(keep, m, rounded)
    small = (e >= SUBNORMAL_EXPONENT) & (e < POWER_OF_TWO_BELOW)
    rounded = torch.where(small, torch.where(m > 1.5, 2.0, 1.0), rounded)
    value = torch.ldexp(rounded, e.float()) * half.sign()
    subnormal = e < SUBNORMAL_EXPONENT  # (a zero has m = 0 and rounds to 0 in the first rule)
    kept_subnormal = subnormal & keep if keep is not None else torch.zeros_like(subnormal)
    return torch.where(subnormal & ~kept_subnormal, torch.zeros_like(value), torch.where(kept_subnormal, half, value))


def keep_mask(w: torch.Tensor, input_square_sums: torch.Tensor, proportion: float = KEEP_PROPORTION) -> torch.Tensor:
    """Bool [out, in]: the weights whose rounding error, weighted by √(Σ x_k²) of their input column, ranks in
    the top `proportion` (the established tool's index: the value at position int(numel·proportion − 1) of the
    descending order is the threshold)."""
    metric = (w.float() - round_mantissa(w)).abs() * input_square_sums.float().clamp(min=0).sqrt()[None, :]
    ranked = metric.flatten().sort(descending=True).values
    threshold = ranked[min(max(int(metric.numel() * proportion - 1), 0), metric.numel() - 1)]
    return metric >= threshold
