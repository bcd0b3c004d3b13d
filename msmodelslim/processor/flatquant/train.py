"""The learnable parts of FlatQuant (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024, §3) and
the fake quantization they are trained through.

For a group of linears that read the same input (q/k/v, gate/up; o_proj and down_proj alone), one transform
P = L ⊗ R, each factor U·diag(σ)·Vᵀ with U, V orthogonal (Cayley map; "tran_type svd"), so that its inverse
transpose U·diag(1/σ)·Vᵀ costs no matrix inverse. The group's input x becomes x' = x·P (per token, Lᵀ·X·R), each
weight W becomes W·P⁻ᵀ, and the layer computes Q_a(x')·Q_w(W·P⁻ᵀ)ᵀ, with

    Q_a: per token, s = max|x'|·sigmoid(α)/7, codes clamp(round(x'/s), −8, 7)   (one α per group: the kernel's);
    Q_w: per row,   s = max|w|·sigmoid(β_row)/7, codes clamp(round(w/s), −7, 7)  (what min/max rounding of the
         weight clamped to ±sigmoid(β_row)·max|w| gives, so linear_quant reproduces it).

Rounding passes the gradient straight through (STE); the maxima and the clip logits get theirs as computed.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from msmodelslim.ir.flat_transform import CLIP_RATIO, LEFT_TRANS, RIGHT_TRANS, decompose_dim, transform_input
from msmodelslim.quantizer.primitives import round_ste

TINY = torch.finfo(torch.float32).tiny


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float32: FlatQuant's start."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def fake_quant_tokens(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Q_a above: per-token symmetric int4 with the range clipped to `clip` (in (0, 1)) of each token's max."""
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip / 7).clamp(min=TINY)
    return torch.clamp(round_ste(x / scale), -8, 7) * scale


def fake_quant_rows(w: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Q_w above: per-row symmetric int4, row r clipped to clip[r] of its max."""
    scale = (w.abs().amax(dim=1, keepdim=True) * clip.reshape(-1, 1) / 7).clamp(min=TINY)
    return torch.clamp(round_ste(w / scale), -7, 7) * scale


class KroneckerFactor(nn.Module):
    """M = U·diag(σ)·Vᵀ; U and V start Haar-random, σ at ones."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        super().__init__()
        self.u = self._orthogonal(size, generator)
        self.v = self._orthogonal(size, generator)
        self.sigma = nn.Parameter(torch.ones(size))

    @staticmethod
    def _orthogonal(size: int, generator: torch.Generator) -> nn.Linear:
        linear = nn.Linear(size, size, bias=False)
        with torch.no_grad():
            linear.weight.copy_(random_orthogonal(size, generator))
        return orthogonal(linear, orthogonal_map="cayley", use_trivialization=False)

    def matrix(self) -> torch.Tensor:
        return self.u.weight @ torch.diag(self.sigma) @ self.v.weight.T

    def inverse_transpose(self) -> torch.Tensor:
        return self.u.weight @ torch.diag(1 / self.sigma) @ self.v.weight.T


class GroupTransform(nn.Module):
    """The transform and the activation clip of one group of linears sharing an input of size a·b."""

    def __init__(self, in_features: int, generator: torch.Generator, clip_init: float) -> None:
        super().__init__()
        a, b = decompose_dim(in_features)
        self.left = KroneckerFactor(a, generator)
        self.right = KroneckerFactor(b, generator)
        self.clip_logit = nn.Parameter(torch.tensor([clip_init]))

    def transform_parameters(self) -> list[nn.Parameter]:
        return [*self.left.parameters(), *self.right.parameters()]

    @torch.no_grad()
    def learned(self) -> dict[str, torch.Tensor]:
        """{left_trans, right_trans, clip_ratio} as the layer will hold them (float32)."""
        return {LEFT_TRANS: self.left.matrix().detach().float(), RIGHT_TRANS: self.right.matrix().detach().float(),
                CLIP_RATIO: torch.sigmoid(self.clip_logit.detach()).float().reshape(1)}


class FlatTrainLinear(nn.Module):
    """A linear as it trains: Q_a(x·P)·Q_w(W·P⁻ᵀ)ᵀ + b with its group's P and clip, and its own weight clip."""

    def __init__(self, linear: nn.Linear, group: GroupTransform, clip_init: float) -> None:
        super().__init__()
        self.linear = linear  # kept to be put back; its weight and bias are not trained
        self.group = group
        self.weight_clip_logit = nn.Parameter(torch.full((linear.out_features,), clip_init))

    def transformed_weight(self) -> torch.Tensor:
        g = self.group
        return transform_input(self.linear.weight.float(), g.left.inverse_transpose(), g.right.inverse_transpose())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        x_t = transform_input(x.float(), g.left.matrix(), g.right.matrix())
        x_q = fake_quant_tokens(x_t, torch.sigmoid(g.clip_logit))
        w_q = fake_quant_rows(self.transformed_weight(), torch.sigmoid(self.weight_clip_logit))
        bias = None if self.linear.bias is None else self.linear.bias.float()
        return nn.functional.linear(x_q, w_q, bias).to(x.dtype)

    @torch.no_grad()
    def weight_clip(self) -> torch.Tensor:
        return torch.sigmoid(self.weight_clip_logit.detach()).float()
