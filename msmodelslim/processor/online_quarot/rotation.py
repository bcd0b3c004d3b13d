"""Online QuaRot (QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs, Ashkboos et al. 2024): a Hadamard
rotation applied to an activation at run time, where no weight can absorb it offline.

The rotation is R = H/√n for a ±1 Hadamard matrix H of order n (processor/quarot/hadamard.py), or, with
block_size b > 0, the block-diagonal diag(H_b/√b, ..., H_b/√b) of n/b blocks. R is orthogonal (R·Rᵀ = I), so
rotating both operands of a dot product leaves it unchanged, while each rotated coordinate mixes all the others
(outliers spread evenly, which is what a quantizer of Q/K/V or of a linear's input wants):

    x' = x·Rᵀ   (what the saved rotation does at run time, row-vector convention)

At an attention's q_rot/k_rot sites (rotation_type "replace", n = head_dim), applied after RoPE and the q/k norms,
right before the attention kernel (where FA3 quantizes Q and K), the scores are unchanged:

    (q·Rᵀ)·(k·Rᵀ)ᵀ = q·Rᵀ·R·kᵀ = q·kᵀ

(A linear-input site, x·Wᵀ = (x·Rᵀ)·(W·Rᵀ)ᵀ with W rotated offline, is the same algebra; no family declares one yet.)

Exact in float; the matrix is saved as a FLOAT tensor named after its module (protocol.md §4.4, "online_quarot
wrapper"), which the serving side (MindIE-SD) applies to the activation.
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.processor.quarot.hadamard import block_diagonal, hadamard


def rotation_matrix(size: int, block_size: int = -1) -> torch.Tensor:
    """R (float64, orthogonal): H/√size, or block-diagonal H_b/√b when block_size b > 0. ValueError when no
    Hadamard construction reaches the order, or b does not divide size."""
    order = size if block_size <= 0 else block_size
    if size % order:
        raise ValueError(f"block_size {block_size} does not divide the rotated size {size}")
    h = hadamard(order)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {order} is known here (sizes reached: powers of two, Paley "
                         f"orders and their Kronecker products); set block_size to a power of two dividing {size}")
    block = h / order ** 0.5
    return block if order == size else block_diagonal(block, size // order)


class OnlineRotation(nn.Module):
    """x -> x·Rᵀ over the last dimension, in float32. `rotation` is a non-persistent buffer: the writers save it
    under the module's own name (not `<name>.rotation`), as the established format does."""

    def __init__(self, rotation: torch.Tensor) -> None:
        super().__init__()
        if rotation.dim() != 2 or rotation.shape[0] != rotation.shape[1]:
            raise ValueError(f"an online rotation is a square matrix, got {list(rotation.shape)}")
        self.register_buffer("rotation", rotation.float(), persistent=False)

    @property
    def size(self) -> int:
        return self.rotation.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"online rotation of size {self.size} applied to a tensor of shape {list(x.shape)}")
        return (x.float() @ self.rotation.T.to(x.device)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"online rotation {self.size}x{self.size}"

