"""SVDQuant's low-rank branch (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit
Diffusion Models", ICLR 2025): a linear's weight W [out, in] is split into a rank-r part kept in high precision
and a residual R that is quantized,

    W = R + l2 · l1,   l1 = Vᵣᵀ [r, in],   l2 = Uᵣ · Sᵣ [out, r]   (Uᵣ Sᵣ Vᵣᵀ: the truncated SVD of W),
    y = x Rᵀ + (x l1ᵀ) l2ᵀ + b.

The names and shapes are the established writer's (`<p>.svd_lowrank_l1` [r, in], `<p>.svd_lowrank_l2`
[out, r], formats.md A.4.4): l1 projects the input down to r channels, l2 maps them to the outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

LOWRANK_L1 = "svd_lowrank_l1"
LOWRANK_L2 = "svd_lowrank_l2"


def lowrank_output(x: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """(x l1ᵀ) l2ᵀ: the low-rank branch, never materialising the [out, in] product."""
    return nn.functional.linear(nn.functional.linear(x, l1), l2)


def check_lowrank_pair(l1: torch.Tensor, l2: torch.Tensor, out_features: int, in_features: int) -> None:
    """l1 [r, in] and l2 [out, r] with the same r, 0 < r <= min(out, in); ValueError naming what is wrong."""
    if l1.dim() != 2 or l2.dim() != 2:
        raise ValueError(f"{LOWRANK_L1} and {LOWRANK_L2} must be 2-D, got {list(l1.shape)} and {list(l2.shape)}")
    rank = l1.shape[0]
    if list(l1.shape) != [rank, in_features] or list(l2.shape) != [out_features, rank]:
        raise ValueError(f"{LOWRANK_L1} {list(l1.shape)} / {LOWRANK_L2} {list(l2.shape)} do not form a rank-r pair "
                         f"for a [{out_features}, {in_features}] layer (expected [r, {in_features}] and "
                         f"[{out_features}, r])")
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(f"low-rank rank {rank} is outside 1..{min(out_features, in_features)}")


class LowRankResidualLinear(nn.Linear):
    """A float linear after `svd_res`: `weight` holds the residual R, buffers the low-rank pair. Its forward is
    the original layer's up to float rounding; `linear_quant` quantizes R and carries the pair into the
    QuantLinear. Still an nn.Linear, so every rule that selects linears selects it."""

    def __init__(self, residual: torch.Tensor, bias: Optional[torch.Tensor], l1: torch.Tensor, l2: torch.Tensor):
        out_features, in_features = residual.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")  # no init work
        check_lowrank_pair(l1, l2, out_features, in_features)
        self.weight = nn.Parameter(residual, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self.register_buffer(LOWRANK_L1, l1)
        self.register_buffer(LOWRANK_L2, l2)

    @property
    def rank(self) -> int:
        return self.svd_lowrank_l1.shape[0]

    def folded_weight(self) -> torch.Tensor:
        """W = R + l2·l1: the layer as one float weight again (for a layer that stays float)."""
        return self.weight + (self.svd_lowrank_l2.float() @ self.svd_lowrank_l1.float()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lowrank = lowrank_output(x, self.svd_lowrank_l1.to(x.dtype), self.svd_lowrank_l2.to(x.dtype))
        return nn.functional.linear(x, self.weight, self.bias) + lowrank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, svd_rank={self.rank}"
