"""FA3 attention quantization as tensor functions: per-head ranges of the attention's Q, K and V, their static
int8 scales, and what the attention kernel computes with them (formats.md A.6, implementation_notes (3)).

An attention tensor is [batch, heads, tokens, dim]; head h has one scale, fp32 [heads, 1] as saved:

    q[h] = clamp(round(x[h] / s[h]), -128, 127)        x̂[h] = q[h] · s[h]
    s[h] = max(|min_h|, |max_h|) / 127                 (symmetric minmax over every calibration token; offset 0)

The offset is saved as zeros and never read: the engine dequantizes with the scale alone, as C8 does.
"""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.primitives import int_range, scale_offset_from_minmax

BITS = 8


def _per_head(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [heads, 1] parameter shaped to broadcast over a [batch, heads, tokens, dim] tensor."""
    return t.float().reshape(1, like.shape[1], 1, 1)


def fake_quantize_heads(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 with one scale per head and dequantized with that scale, in float32."""
    qmin, qmax = int_range(BITS)
    s = _per_head(scale, x)
    return (torch.clamp(torch.round(x.float() / s), qmin, qmax) * s).to(x.dtype)



class HeadRange:
    """Running per-head min and max of an attention tensor over every token it sees."""

    def __init__(self) -> None:
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        heads = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # [heads, batch·tokens·dim]
        lo, hi = heads.amin(dim=1), heads.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min is not None

    def merge(self, collective, heads: int) -> None:
        """dp_layer_wise: min and max over every rank's tokens, exactly what one process would keep."""
        lo = self.min if self.seen else torch.full((heads,), float("inf"))
        hi = self.max if self.seen else torch.full((heads,), float("-inf"))
        lo, hi = collective.min(lo), collective.max(hi)
        if bool(torch.isfinite(lo).all()):
            self.min, self.max = lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8: scale fp32 [heads, 1], offset zeros [heads, 1]."""
        scale, offset = scale_offset_from_minmax(self.min, self.max, BITS, symmetric=True)
        return scale.reshape(-1, 1), offset.reshape(-1, 1)
