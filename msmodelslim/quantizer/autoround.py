"""AutoRound: weight rounding and clipping tuned by signed gradient descent.

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023.
Round-to-nearest is the best rounding for each weight alone, not for the layer output. AutoRound adds a
learnable offset V ∈ [−0.5, 0.5] inside the rounding and learnable factors a, b ∈ [0.5, 1] on each group's
max and min (the clipping range), and minimises the output error on calibration inputs:

    s, z   = range(b · min W_g, a · max W_g)
    Ŵ      = (clamp(⌊W / s + V⌉ + z) − z) · s               (⌊·⌉ with a straight-through gradient)
    loss   = mean ‖Q_a(X) · Ŵᵀ − X · Wᵀ‖²

with the update p ← p − lr · sign(∂loss/∂p). The paper tunes a whole decoder block; here each linear is tuned
on its own inputs (the layer-wise objective), which fits the one-block-at-a-time runner. The parameters with the
lowest loss over all steps are kept; step 0 is round-to-nearest, so the result never loses to min/max on the
tuning rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from msmodelslim.quantizer.primitives import int_range, round_ste, scale_offset_from_minmax, to_groups


@dataclass(frozen=True)
class AutoRoundSettings:
    iters: int = 10
    # The paper's default is 1 / iters at 200 iters, i.e. 0.005. Kept at 0.005 for any iters: with the
    # protocol's 10 iters, 1 / iters = 0.1 overshoots and no step beats round-to-nearest.
    lr: float = 0.005
    tune_rounding: bool = True
    tune_range: bool = True
    scale_dtype: torch.dtype = torch.bfloat16


def _qparams(lo, hi, a, b, bits, symmetric, scale_dtype):
    scale, offset = scale_offset_from_minmax(lo * b, hi * a, bits, symmetric)
    # the stored scale has scale_dtype; tune with the value the kernel will see (gradient passes through)
    scale = scale + (scale.to(scale_dtype).float() - scale).detach()
    return scale, offset


def fake_quantize_groups(groups, v, a, b, bits, symmetric, scale_dtype):
    """Ŵ for groups [out, G, size] with rounding offsets v [out, G, size] and range factors a, b [out, G]."""
    qmin, qmax = int_range(bits)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale, offset = _qparams(lo, hi, a, b, bits, symmetric, scale_dtype)
    q = torch.clamp(round_ste(groups / scale.unsqueeze(-1) + v) + offset.unsqueeze(-1), qmin, qmax)
    return (q - offset.unsqueeze(-1)) * scale.unsqueeze(-1)


def signed_descent(loss_of: Callable[[], torch.Tensor], tensors: list[torch.Tensor],
                   bounds: list[tuple[float, float]], settings: AutoRoundSettings
                   ) -> tuple[float, float, list[torch.Tensor]]:
    """Minimise loss_of() over the tensors that require grad by p <- clamp(p - lr * sign(dloss/dp), bounds), for
    settings.iters steps; (the lowest loss seen, the step-0 loss, copies of all `tensors` at the lowest loss)."""
    trainable = [t for t in tensors if t.requires_grad]
    best, first = (float("inf"), [t.detach().clone() for t in tensors]), None
    for step in range(settings.iters + 1):  # the last pass only scores the final update
        with torch.enable_grad():  # the runner calls processors under no_grad
            loss = loss_of()
        value = float(loss.detach())
        first = value if first is None else first
        if value < best[0]:
            best = (value, [t.detach().clone() for t in tensors])
        if step == settings.iters or not trainable:
            break
        grads = torch.autograd.grad(loss, trainable)
        with torch.no_grad():
            for p, g in zip(trainable, grads):
                p -= settings.lr * torch.sign(g)
            for t, (low, high) in zip(tensors, bounds):
                t.clamp_(low, high)
    return best[0], first, best[1]


def autoround_quantize(w: torch.Tensor, x: torch.Tensor, x_quantized: torch.Tensor, bits: int, symmetric: bool,
                       group_size: Optional[int], settings: AutoRoundSettings):
    """(codes int8 [out, in], scale [out, n_groups], offset [out, n_groups], the best loss and the step-0 loss).
    `x` are float input rows [n, in]; `x_quantized` the same rows as the kernel quantizes them."""
    groups = to_groups(w.detach().float(), group_size)
    reference = x.float() @ w.detach().float().T
    xq = x_quantized.float()
    v = torch.zeros_like(groups, requires_grad=settings.tune_rounding)
    a = torch.ones(groups.shape[:2], requires_grad=settings.tune_range)
    b = torch.ones(groups.shape[:2], requires_grad=settings.tune_range and not symmetric)

    def loss_of() -> torch.Tensor:
        w_hat = fake_quantize_groups(groups, v, a, b, bits, symmetric, settings.scale_dtype).reshape(w.shape)
        return (xq @ w_hat.T - reference).pow(2).mean()

    loss, first, (v, a, b) = signed_descent(loss_of, [v, a, b], [(-0.5, 0.5), (0.5, 1.0), (0.5, 1.0)], settings)
    with torch.no_grad():
        qmin, qmax = int_range(bits)
        scale, offset = _qparams(groups.amin(-1), groups.amax(-1), a, b, bits, symmetric, settings.scale_dtype)
        q = torch.clamp(torch.round(groups / scale.unsqueeze(-1) + v) + offset.unsqueeze(-1), qmin, qmax)
    return q.to(torch.int8).reshape(w.shape), scale.float(), offset, loss, first
