"""The alpha/beta search of Flex Smooth Quant as pure tensor functions.

For a candidate (α, β) the scale is s_j = max|X_j|^α / max|W_j|^β, and its cost is the relative error of the
int8 product after smoothing:

    err = ‖Q_act(X / s) · Q_w(W · s)ᵀ − X · Wᵀ‖ / ‖X · Wᵀ‖

with Q_w symmetric per output channel and Q_act per token (dynamic) or per tensor (static, asymmetric), i.e.
what the kernels will compute. Stage 1 scans α on a 0.05 grid with β = 1 − α (plain SmoothQuant); stage 2
keeps the best α and scans β, accepting a β only if it does not increase the error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from msmodelslim.quantizer.error import scaled_output_error
from msmodelslim.quantizer.scheme import QConfig

GRID = [round(0.05 * i, 2) for i in range(21)]


def flex_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^β, at least 1e-5; channels that never fired keep s = 1."""
    s = act_absmax.float().pow(alpha) / weight_absmax.float().clamp(min=1e-5).pow(beta)
    return torch.where(act_absmax > 0, s.clamp(min=1e-5), torch.ones_like(s))


# What the kernels compute: symmetric int8 weights per output channel; int8 activations per token (dynamic)
# or over the whole tensor, asymmetric (static).
INT8_WEIGHT = QConfig(dtype="int8", scope="per_channel", symmetric=True, method="minmax")
INT8_ACT = {"per_token": QConfig(dtype="int8", scope="per_token", symmetric=True, method="minmax"),
            "per_tensor": QConfig(dtype="int8", scope="per_tensor", symmetric=False, method="minmax")}


def quantized_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, act_scope: str,
                    reference: Optional[torch.Tensor] = None) -> float:
    """Relative error of the int8 product of X/s and W·s against the float product X·Wᵀ."""
    reference = x @ weight.T if reference is None else reference
    return scaled_output_error(x, weight, s, INT8_WEIGHT, INT8_ACT[act_scope], reference)


@dataclass(frozen=True)
class SearchResult:
    alpha: float
    beta: float
    error: float


def two_stage_search(cost: Callable[[float, float], float], alpha: Optional[float] = None,
                     beta: Optional[float] = None) -> tuple[SearchResult, dict[tuple[float, float], float]]:
    """Best (α, β) under `cost`, and every candidate scored on the way. A given alpha or beta is kept fixed."""
    scored: dict[tuple[float, float], float] = {}

    def score(a: float, b: float) -> float:
        key = (a, round(b, 2))
        if key not in scored:
            scored[key] = cost(a, b)
        return scored[key]

    if alpha is None:  # stage 1: SmoothQuant's one-parameter family (or the fixed beta)
        best_error, alpha = min(((score(a, 1 - a if beta is None else beta), a) for a in GRID),
                                key=lambda t: (t[0], -t[1]))
    else:
        best_error = score(alpha, 1 - alpha if beta is None else beta)
    if beta is not None:
        return SearchResult(alpha, beta, best_error), scored
    best_beta = 1 - alpha
    for b in GRID:  # stage 2: free beta, kept only when it helps
        error = score(alpha, b)
        if error < best_error:
            best_error, best_beta = error, b
    return SearchResult(alpha, round(best_beta, 2), best_error), scored


def search_alpha_beta(x: torch.Tensor, weight: torch.Tensor, scales_for: Callable[[float, float], torch.Tensor],
                      act_scope: str, alpha: Optional[float] = None, beta: Optional[float] = None) -> SearchResult:
    """Best (α, β) for this input sample and (concatenated) target weight under the int8 product error.
    `scales_for(α, β)` gives s in the target's input-channel space."""
    reference = x @ weight.T
    return two_stage_search(lambda a, b: quantized_error(x, weight, scales_for(a, b), act_scope, reference),
                            alpha, beta)[0]
