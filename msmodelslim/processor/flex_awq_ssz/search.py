"""The AWQ scale search as pure tensor functions.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024.
Scaling input channel j of a linear by s_j (X / s, W · s) is exact in float, but the quantizer now sees
W · s: channels with large mean activations get a larger share of the weight's range and lose less to rounding.
The scale of a candidate (α, β) is

    s_j = mean|X_j|^α / mean|Ŵ_j|^β,    normalised so that √(max s · min s) = 1

where Ŵ is |W| divided by its group's (or row's) max and averaged over output rows (β = 0 is the paper's
rule; β = 1 − α is AWQ's "duo scaling"). A candidate's cost is the relative error of the layer outputs

    err = ‖Q_a(X / s) · Q_w(W · s)ᵀ − X · Wᵀ‖ / ‖X · Wᵀ‖

with Q_w and Q_a the quantizers that will be deployed (Q_a the identity for weight-only schemes);
quantizer/error.py computes it.
"""
from __future__ import annotations

from typing import Callable

import torch

from msmodelslim.quantizer.primitives import to_groups

TINY = 1e-8


def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """mean over output rows of |W| / max|W| of its group, per input channel, over all target weights."""
    rows = []
    for w in weights:
        groups = to_groups(w.detach().float().abs(), group_size)
        rows.append((groups / groups.amax(-1, keepdim=True).clamp(min=TINY)).reshape(w.shape))
    return torch.cat(rows).mean(dim=0)


def awq_scales(act_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = mean|X|^α / mean|Ŵ|^β, normalised; channels that never fired keep s = 1 before normalising."""
    s = act_mean.float().clamp(min=TINY).pow(alpha) / w_mean.float().clamp(min=TINY).pow(beta)
    s = torch.where(act_mean > 0, s, torch.ones_like(s))
    return (s / (s.max() * s.min()).sqrt()).clamp(min=1e-5)


def best_candidate(scored: dict[tuple[float, float], float], rescore: Callable[[float, float], float] | None,
                   top: int) -> tuple[tuple[float, float], float]:
    """The lowest-cost (α, β); with `rescore`, the `top` cheapest are scored again by it and it decides."""
    ranked = sorted(scored.items(), key=lambda item: item[1])
    if rescore is None:
        return ranked[0]
    rescored = [(pair, rescore(*pair)) for pair, _ in ranked[:top]]
    return min(rescored, key=lambda item: item[1])
