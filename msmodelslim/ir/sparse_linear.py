"""`SparseFloatLinear`: a linear layer whose float weight has been pruned (many exact zeros), ascendv1 type
`W16A16S`. Activations stay float; the forward is an ordinary matmul. Written by `float_sparse`, read back by
the ascendv1 reader; the zeros are what the Atlas 300I (310P) compression tool turns into W16A16SC.

It is deliberately not an `nn.Linear`: a later step must not take it for a float layer and quantize it again.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

W16A16S = "W16A16S"


class SparseFloatLinear(nn.Module):
    scheme = W16A16S

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError("a sparse float weight must be a 2-D float tensor")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @property
    def sparsity(self) -> float:
        """Share of exact zeros in the weight."""
        return float((self.weight == 0).sum()) / self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{W16A16S}, in={self.in_features}, out={self.out_features}, sparsity={self.sparsity:.3f}"
