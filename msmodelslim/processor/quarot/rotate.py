"""The weight rewrites of an offline rotation, as pure in-place functions (row-vector convention: a linear
computes y = x·Wᵀ + b with W of shape [out, in]).

Rotating the residual stream h → h·Q (Q orthogonal) is exact when every reader and writer compensates:
- a reader (y = h·Wᵀ) becomes W·Q, since (h·Q)·(W·Q)ᵀ = h·Wᵀ;
- a writer (adds y to h) becomes Qᵀ·W and b·Q, so that its output arrives rotated;
- the embedding table E becomes E·Q.
RMSNorm commutes with Q only without its weight (‖h·Q‖ = ‖h‖), so each norm's weight g is first folded into
its readers (W·diag(g)) and set to 1.
"""
from __future__ import annotations

import torch
from torch import nn


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float32 (the working precision): float64 would cost minutes per layer on 7B-sized weights
    device = a.device if a.device.type != "cpu" else b.device
    return (a.float().to(device) @ b.float().to(device)).to(a.dtype)


@torch.no_grad()
def fold_norm_into_readers(norm: nn.Module, readers: list[nn.Linear]) -> None:
    for linear in readers:
        linear.weight.mul_(norm.weight.to(linear.weight.dtype).unsqueeze(0))
    norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_reader(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight.copy_(_matmul(linear.weight, q))


@torch.no_grad()
def rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight.copy_(_matmul(q.T, linear.weight))
    if linear.bias is not None:
        linear.bias.copy_(_matmul(linear.bias.unsqueeze(0), q).squeeze(0))


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, q: torch.Tensor) -> None:
    embedding.weight.copy_(_matmul(embedding.weight, q))


@torch.no_grad()
def rotate_heads(value: nn.Linear, output: nn.Linear, h: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Per-head rotation of the attention values: each value head v_k → v_k·H (v_proj rows Hᵀ·W_k, bias
    b_k·H), and each query head's o_proj columns W_o[:, head] → W_o[:, head]·H. Attention mixes tokens, not
    channels, so (A·V·H)·(W_o·H)ᵀ = A·V·W_oᵀ per head, also when several query heads share a value head."""
    d = h.shape[0]
    h = h.to(value.weight.device)
    w = value.weight.view(num_kv_heads, d, -1)
    w.copy_(torch.einsum("ji,kjc->kic", h.float(), w.float()).to(w.dtype))
    if value.bias is not None:
        b = value.bias.view(num_kv_heads, d)
        b.copy_(_matmul(b, h))
    o = output.weight.view(output.weight.shape[0], num_heads, d)
    o.copy_(torch.einsum("rkj,ji->rki", o.float(), h.float()).to(o.dtype))
