"""ADMM pruning: Boža, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024.

Prune a linear's weight W [out, in] to a sparsity ratio r while keeping its output on the calibration inputs X
close: minimise ‖XW^T − XŴ^T‖² subject to Ŵ having r·numel zeros. With H = XᵀX this is a least-squares problem
under a mask constraint, which ADMM splits into a ridge step on W and a projection on Z (Z holds the zeros):

    W ← (H + ρI)⁻¹ (H·W₀ + ρ(Z − U))        (closed form; H⁻¹ is computed once)
    Z ← (W + U) ⊙ M,   M = keep all but the r·numel smallest |W + U|   (one threshold for the whole layer)
    U ← U + W − Z

As the established tool does: H is normalised to unit diagonal (W scaled by the same √diag(H), so the problem is
unchanged) and damped by 0.1·mean(diag H) before use, ρ = 1, 20 iterations, the mask re-chosen in the first 15
and then held; the result is (W + U) ⊙ M, whose zeros are exactly the mask's. Magnitude pruning (the same mask
rule on W alone, no update) is the baseline ADMM improves on.
"""
from __future__ import annotations

import torch

ITERATIONS = 20
MASK_ITERATIONS = 15  # the mask is re-chosen in these first iterations, then held
PERCDAMP = 0.1  # damping, as a fraction of the mean of the normalised Hessian's diagonal (which is ~1)
RHO = 1.0


def accumulate_gram(gram: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Running H = Σ XᵀX over every token row of x ([..., in]), in float32 as the established tool sums it."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    update = x.T @ x
    return update if gram is None else gram.add_(update)


def smallest_mask(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask that is False at exactly int(ratio·numel) entries of smallest |values| (one layer-wide
    threshold, ties broken by position) and True elsewhere."""
    count = int(values.numel() * ratio)
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    if count:
        keep[values.abs().flatten().topk(count, largest=False).indices] = False
    return keep.reshape(values.shape)


def magnitude_prune(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The baseline: zero the int(ratio·numel) weights of smallest magnitude, keep the rest as they are."""
    return weight * smallest_mask(weight, ratio)


@torch.no_grad()
def admm_prune(weight: torch.Tensor, gram: torch.Tensor, ratio: float, iterations: int = ITERATIONS,
               mask_iterations: int = MASK_ITERATIONS, percdamp: float = PERCDAMP, rho: float = RHO) -> torch.Tensor:
    """W [out, in] pruned to exactly int(ratio·numel) zeros (float32) with the ADMM weight update; `gram` is
    H = XᵀX [in, in] of the layer's calibration inputs."""
    norm = torch.diagonal(gram).float().sqrt() + 1e-8
    h = gram.double() / norm.double()[:, None] / norm.double()[None, :]
    w0 = (weight.detach().float() * norm).T.contiguous()  # [in, out]: the problem in normalised coordinates
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hw0 = (h.float() @ w0)
    h += rho * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    # SPD thanks to the damping; inverted once, in float64 on the CPU (accelerators may lack float64 Cholesky)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h.cpu())).float().to(w0.device)
    w, u = w0.clone(), torch.zeros_like(w0)
    mask = torch.ones_like(w0, dtype=torch.bool)
    for step in range(iterations):
        if step < mask_iterations:
            mask = smallest_mask(w + u, ratio)
        z = (w + u) * mask
        u += w - z
        w = h_inv @ (hw0 + rho * (z - u))
    return ((w + u) * mask).T / norm
