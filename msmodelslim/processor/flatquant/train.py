"""The learnable parts of FlatQuant (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024, §3) and
the fake quantization they are trained through.

For a group of linears that read the same input (q/k/v, gate/up; o_proj and down_proj alone), one transform
P = L ⊗ R, each factor U·diag(σ)·Vᵀ with U, V orthogonal (Cayley map; "tran_type svd"), so that its inverse
transpose U·diag(1/σ)·Vᵀ costs no matrix inverse. The group's input x becomes x' = x·P (per token, Lᵀ·X·R), each
weight W becomes W·P⁻ᵀ, and the layer computes Q_a(x')·Q_w(W·P⁻ᵀ)ᵀ, with

    Q_a: per token, s = max|x'|·sigmoid(α)/7, codes clamp(round(x'/s), −8, 7)   (one α per group: the kernel's);
    Q_w: per row,   s = max|w|·sigmoid(β_row)/7, codes clamp(round(w/s), −7, 7)  (what min/max rounding of the
         weight clamped to ±sigmoid(β_row)·max|w| gives, so linear_quant reproduces it).

For W4A4_MXFP4 behind the transform both are MXFP4 instead: the token clipped to ±sigmoid(α)·max|x'| and the row
to ±sigmoid(β_row)·max|w|, then E2M1 elements under the OCP shared exponent of each block of 32 (what W4A4_MXFP4's
run-time activations and its min/max weight rounding compute). A row-parallel layer's L is block-diagonal: one
factor per tensor-parallel rank (ir/flat_transform.flat_dims).

Rounding passes the gradient straight through (STE); the maxima and the clip logits get theirs as computed (the
MX exponents are held fixed within a step).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from msmodelslim.ir.flat_transform import (CLIP_RATIO, LEFT_TRANS, RIGHT_TRANS, FlatDims, symmetric_clip,
                                           transform_input)
from msmodelslim.quantizer.float_formats import (FP4_E2M1_EMAX, FP4_E2M1_MAX, power_of_two, round_fp4_e2m1,
                                                 shared_exponent, to_blocks)
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


def fake_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 along the last axis in blocks of 32, the exponent fixed from the block maxima, rounding passed
    straight through (saturated values get no gradient)."""
    blocks = to_blocks(x)
    scale = power_of_two(shared_exponent(blocks.detach().abs().amax(dim=-1), FP4_E2M1_EMAX)).unsqueeze(-1)
    y = (blocks / scale).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    elements = y + (round_fp4_e2m1(y.detach()) - y.detach())
    return (elements * scale).reshape(x.shape)


def fake_mxfp4_tokens(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Q_a for W4A4_MXFP4: each token clipped to `clip` of its max, then MXFP4."""
    return fake_mxfp4(symmetric_clip(x, clip, -1))


def fake_mxfp4_rows(w: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Q_w for W4A4_MXFP4: row r clipped to clip[r] of its max, then MXFP4 along the row."""
    return fake_mxfp4(symmetric_clip(w, clip.reshape(-1, 1), 1))


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


class BlockDiagonalFactor(nn.Module):
    """A left factor that stays inside tensor-parallel ranks: one KroneckerFactor per diagonal block."""

    def __init__(self, size: int, blocks: int, generator: torch.Generator) -> None:
        super().__init__()
        self.factors = nn.ModuleList(KroneckerFactor(size // blocks, generator) for _ in range(blocks))

    def matrix(self) -> torch.Tensor:
        return torch.block_diag(*(f.matrix() for f in self.factors))

    def inverse_transpose(self) -> torch.Tensor:
        return torch.block_diag(*(f.inverse_transpose() for f in self.factors))


class GroupTransform(nn.Module):
    """The transform and the activation clip of one group of linears sharing an input of size left·right, for
    int4 (W4A4_DYNAMIC) or MXFP4 (W4A4_MXFP4) rounding behind it."""

    def __init__(self, dims: FlatDims, generator: torch.Generator, clip_init: float, mxfp4: bool = False) -> None:
        super().__init__()
        self.mxfp4 = mxfp4
        self.left = (KroneckerFactor(dims.left, generator) if dims.left_blocks == 1
                     else BlockDiagonalFactor(dims.left, dims.left_blocks, generator))
        self.right = KroneckerFactor(dims.right, generator)
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
        tokens, rows = (fake_mxfp4_tokens, fake_mxfp4_rows) if g.mxfp4 else (fake_quant_tokens, fake_quant_rows)
        x_q = tokens(x_t, torch.sigmoid(g.clip_logit))
        w_q = rows(self.transformed_weight(), torch.sigmoid(self.weight_clip_logit))
        bias = None if self.linear.bias is None else self.linear.bias.float()
        return nn.functional.linear(x_q, w_q, bias).to(x.dtype)

    @torch.no_grad()
    def weight_clip(self) -> torch.Tensor:
        return torch.sigmoid(self.weight_clip_logit.detach()).float()
