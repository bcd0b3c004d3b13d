"""KV-cache int8 ("C8") as tensor functions: the per-channel ranges of cached K/V, their scales, and what the
serving engine computes when it writes the cache and reads it back (vLLM-Ascend, formats.md A.6).

A cache tensor is [batch, kv_heads, tokens, head_dim]; its channels are the flattened (kv_head, head_dim) axis,
c = h·D + d, which is how the engine's `kv_cache_scale` [H_kv·D] is indexed:

    write:  q[c] = clamp(round(x[c] / s[c] + o[c]), -128, 127)
    read:   x̂[c] = q[c] · s[c]                      (the scale alone: an offset is never subtracted)

Symmetric minmax: s[c] = max(|min_c|, |max_c|) / 127 over every calibration token, o = 0.

FP8 per tensor, the KV cache vLLM reads from a compressed-tensors `kv_cache_scheme` (fp8 E4M3, `k_scale` /
`v_scale` of one element; vLLM's cache write casts x / s to E4M3 with saturation, its read multiplies by s):

    s = max |x| / 448   over every channel and calibration token     x̂ = e4m3(clamp(x / s, ±448)) · s
"""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.primitives import int_range, scale_offset_from_minmax

BITS = 8


def cache_channels(x: torch.Tensor) -> torch.Tensor:
    """[batch, kv_heads, tokens, head_dim] -> [batch·tokens, kv_heads·head_dim]: one row per cached token."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch * tokens, heads * dim)


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [H·D] parameter shaped to broadcast over a [batch, H, tokens, D] cache tensor."""
    return t.float().reshape(1, like.shape[1], 1, like.shape[3])


def fake_quantize_cache(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """What attention reads back from an int8 cache: quantized on write (with the offset), dequantized with
    the scale alone on read."""
    qmin, qmax = int_range(BITS)
    s, o = _per_channel(scale, x), _per_channel(offset, x)
    q = torch.clamp(torch.round(x.float() / s + o), qmin, qmax)
    return (q * s).to(x.dtype)


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def fake_quantize_cache_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What attention reads back from an FP8 E4M3 cache with one scale per tensor (round to nearest even)."""
    s = scale.float().reshape(())
    q = torch.clamp(x.float() / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def fp8_tensor_scale(channel_range: "CacheChannelRange") -> torch.Tensor:
    """[1]: max |x| over every channel / 448 (1 where the tensor was identically 0)."""
    absmax = channel_range.absmax.max().reshape(1)
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


class CacheChannelRange:
    """Running per-channel min and max of a cache tensor over every token it is written with."""

    def __init__(self) -> None:
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x.detach().float())
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @staticmethod
    def _extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's min and max per tracked unit (here: per channel of the flattened cache)."""
        rows = cache_channels(x)
        return rows.amin(dim=0), rows.amax(dim=0)

    @property
    def seen(self) -> bool:
        return self.min is not None

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def merge(self, collective, channels: int) -> None:
        """dp_layer_wise: min and max over every rank's tokens, exactly what one process would keep."""
        lo = self.min if self.seen else torch.full((channels,), float("inf"))
        hi = self.max if self.seen else torch.full((channels,), float("-inf"))
        lo, hi = collective.min(lo), collective.max(hi)
        if bool(torch.isfinite(lo).all()):
            self.min, self.max = lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8 (scale [C], offset zeros [C]): the only C8 the engine dequantizes correctly."""
        return scale_offset_from_minmax(self.min, self.max, BITS, symmetric=True)
