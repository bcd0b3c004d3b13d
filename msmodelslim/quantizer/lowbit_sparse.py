"""Low-bit sparse int8 weights (the established tool's sparse quantization, `W8A8S`).

The idea: most weights of a row sit in a narrow range, a few (the outliers) far outside it. Put the bulk on a
`w_bit`-bit grid (4 by default) and keep the outliers on the same grid, extended to int8:

    amax_n = max |W[n, k]| over the row's non-outliers
    s[n]   = max(amax_n / (2^(w_bit-1) - 1),  max_k |W[n, k]| / 127)
    q[n,k] = clamp(round(W[n, k] / s[n]), -127, 127)            (int8, symmetric, offset 0)

Non-outliers get codes in [-(2^(w_bit-1)-1), 2^(w_bit-1)-1], outliers up to ±127; small weights round to 0.
The codes are ordinary symmetric per-channel int8 (the W8A8 kernel runs them unchanged); their low entropy
(mostly 4-bit values and zeros) is what the Atlas 300I (310P) weight compression, which turns `W8A8S` into
`W8A8SC`, exploits. The second term of s[n] only matters for a row whose largest outlier would not fit the int8
range: the scale grows just enough that no weight is clipped.

Outliers, per output row (the established tool's two modes):
- `fraction` f: the ceil(f·K) weights of largest |W| (f = 0 means none: the grid spans the whole row);
- `use_sigma`: the weights with |W − mean| > sigma_factor·std (std of the row, unbiased).
A larger `fraction` (or a smaller `sigma_factor`) protects more outliers: a finer grid for the bulk, fewer zero
codes ("lower sparsity"), higher accuracy.

The established tool computes this in a compiled module whose source is not public; it also refines the
scale by a numerical search. This implementation uses the plain ranges above (see docs/config.md).
"""
from __future__ import annotations

import math

import torch

INT8_MAX = 127


def outlier_mask(w: torch.Tensor, fraction: float, use_sigma: bool, sigma_factor: float) -> torch.Tensor:
    """Bool [out, in]: the weights each row protects as outliers."""
    w = w.float()
    if use_sigma:
        var, mean = torch.var_mean(w, dim=1, keepdim=True)
        return (w - mean).abs() > sigma_factor * var.sqrt()
    k = min(math.ceil(fraction * w.shape[1]), w.shape[1] - 1)  # at least one weight stays in the bulk
    mask = torch.zeros_like(w, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, w.abs().topk(k, dim=1).indices, True)
    return mask


@torch.no_grad()
def lowbit_sparse_quantize(w: torch.Tensor, w_bit: int = 4, fraction: float = 0.01, use_sigma: bool = False,
                           sigma_factor: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, 1], offset zeros [out, 1]), the layout of `quantize_weight_minmax`."""
    w = w.detach().float()
    magnitude = w.abs()
    bulk = magnitude.masked_fill(outlier_mask(w, fraction, use_sigma, sigma_factor), 0.0)
    qmax_bulk = 2 ** (w_bit - 1) - 1
    scale = torch.maximum(bulk.amax(dim=1) / qmax_bulk, magnitude.amax(dim=1) / INT8_MAX)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale, torch.zeros_like(scale)


def code_statistics(codes: torch.Tensor, w_bit: int = 4) -> dict[str, float]:
    """Share of zero codes (the sparsity) and of codes outside the `w_bit` range (the outliers kept in int8)."""
    qmax_bulk = 2 ** (w_bit - 1) - 1
    total = codes.numel()
    return {"zero": float((codes == 0).sum()) / total,
            "outside_bulk": float((codes.to(torch.int16).abs() > qmax_bulk).sum()) / total}
