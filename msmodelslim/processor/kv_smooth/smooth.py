"""kv_smooth maths: a per-channel scale s moved from K into Q before RoPE, as pure tensor functions.

Attention scores are Σ_d Q_d K_d per head, so dividing K's channel d by s_d and multiplying Q's by s_d changes
no score, in float. RoPE (transformers' rotate_half layout) mixes channel d with channel d + D/2 of the same
head; with s equal on each such pair, RoPE(K / s) = RoPE(K) / s, so the scale can be folded into the weights
before RoPE while it acts on K as cached (after RoPE). The key's outlier channels shrink; the query, which is
not cached, carries them.

    a[h, d]  = max |K[h, d]| over the calibration tokens (after RoPE)
    m[h, d]  = max(a[h, d'], a[h, d' + D/2]),  d' = d mod D/2         equal on each RoPE pair
    s[h, d]  = m[h, d] ** smooth_factor                               (1 where K is identically 0)

Folding: into projections, row h·D + d of k_proj (and its bias) is divided by s[h, d] and every query head of
KV group h (GQA: query head j reads KV head j // (heads / kv_heads)) has its rows multiplied by s[h, ·]; into
per-head norms (Qwen3's q_norm/k_norm, one weight of D shared by every head) the scale must be shared too:
m_d = max_h m[h, d] before the power.
"""
from __future__ import annotations

import torch
from torch import nn


def pair_maxima(key_absmax: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[kv_heads·D] -> [kv_heads, D]: each channel's maximum with its RoPE partner, equal on the pair."""
    halves = key_absmax.float().reshape(num_kv_heads, 2, head_dim // 2)
    half = halves.amax(dim=1)
    return torch.cat([half, half], dim=1)


def smoothing_scales(maxima: torch.Tensor, smooth_factor: float) -> torch.Tensor:
    return torch.where(maxima > 0, maxima.pow(smooth_factor), torch.ones_like(maxima))


def query_rows(key_scales: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[kv_heads, D] -> [heads·D]: every query head takes its KV group's scales (GQA)."""
    return key_scales.repeat_interleave(num_heads // key_scales.shape[0], dim=0).reshape(-1)


@torch.no_grad()
def scale_rows(module: nn.Module, factors: torch.Tensor) -> None:
    """Multiply a linear's output rows (weight rows and bias) or a norm's weight (and bias) by `factors`."""
    weight = module.weight
    weight.mul_(factors.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1))))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(factors.to(module.bias.dtype))
