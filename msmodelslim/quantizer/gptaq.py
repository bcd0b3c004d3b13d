"""GPTAQ: Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration" (GPTQv2),
ICML 2025.

GPTQ fits each layer to its own inputs X: min ‖W·X − Ŵ·X‖. Once the layers before are quantized, the layer
is served X̃ ≠ X, and the error they made is never corrected. GPTAQ fits the quantized layer, fed X̃, to the
float layer's output on the float model's inputs X:

    min over Ŵ on the grid of  ‖W·X − Ŵ·X̃‖²

With H̃ = X̃·X̃ᵀ and ΔX = X − X̃, the unconstrained minimum is

    W* = W·X·X̃ᵀ·H̃⁻¹ = W + W·(ΔX·X̃ᵀ)·H̃⁻¹

and ‖W·X − Ŵ·X̃‖² = ‖W·X − W*·X̃‖² + (W* − Ŵ)·H̃·(W* − Ŵ)ᵀ, so GPTQ on the target W* with the Hessian H̃
minimises exactly that objective. Like the paper's code we shrink the correction by `alpha` (0.25 there):
ΔX·X̃ᵀ comes from a finite sample and the full step over-fits it.

X̃ is what the layer will read: where the kernel quantizes its input at run time (per token, per block), X̃ is
that quantized input Q, so the fit also absorbs what the layer's own activation quantization does on average. A
layer whose weight is split into a residual R and a float low-rank pair L (svd_res) computes R̂·Q + L·X̃u (X̃u the
unquantized input), so its target is

    R* = R + alpha·((R + L)·(X − Q)·Qᵀ − L·(X̃u − Q)·Qᵀ)·H̃⁻¹       (H̃ = Q·Qᵀ; Q = X̃u without activation
                                                                    quantization, and the second term vanishes)

All statistics are running means over tokens, scaled like GPTQ's H = 2·X·Xᵀ/n.
"""
from __future__ import annotations

from typing import Optional

import torch


def accumulate_asymmetry(d: Optional[torch.Tensor], count: int, x: torch.Tensor,
                         x_reference: Optional[torch.Tensor]) -> torch.Tensor:
    """Running D = 2·ΔX·X̃ᵀ/n (the layout [in, in] of `accumulate_hessian`, with ΔX = reference − x), before
    `count` is advanced by x's tokens. `x_reference` None: the float model's input is unknown, counted as ΔX = 0."""
    x = x.reshape(-1, x.shape[-1]).double()
    n = x.shape[0]
    d = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device) if d is None else d
    d = d * (count / (count + n))
    if x_reference is not None:
        delta = x_reference.reshape(x.shape).double() - x
        d = d + (2.0 / (count + n)) * (delta.T @ x)
    return d


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, asymmetry: torch.Tensor, alpha: float,
                      percdamp: float, lowrank: Optional[torch.Tensor] = None,
                      input_error: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W* = W + alpha·((W + L)·D − L·E)·(H̃ + λI)⁻¹ in float32 (λ: GPTQ's damping, percdamp·mean diag H̃). L: the
    float low-rank pair l2·l1 served beside the weight (svd_res), None otherwise; E = 2·(X̃u − Q)·Qᵀ/n, what the
    activation quantization moved the input the pair reads by (None: no activation quantization)."""
    h = hessian.double()
    dead = torch.diagonal(h) == 0  # inputs always zero: GPTQ zeroes their columns anyway
    h = h.clone()
    h[dead, dead] = 1.0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    w = weight.double()
    numerator = w @ asymmetry.double()
    if lowrank is not None:
        numerator = numerator + lowrank.double() @ asymmetry.double()
        if input_error is not None:
            numerator = numerator - lowrank.double() @ input_error.double()
    # M·H⁻¹ = (H⁻¹·Mᵀ)ᵀ, H symmetric positive definite after damping
    correction = torch.cholesky_solve(numerator.T.to(h.device), torch.linalg.cholesky(h)).T
    return (w + alpha * correction.to(w.device)).float()
