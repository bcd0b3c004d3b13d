"""FA3 attention quantization as modules: `FA3HeadQuant` is one branch (Q, K or V) quantized to int8 with a static
scale per head (quantizer/fa3.py); `FA3Observer` is the placeholder that records a branch's per-head range during
calibration. The adapter's rewiring (model/fa3.py) passes Q, K and V through the attention's children `fa_q`,
`fa_k`, `fa_v`, whichever of the two they are; the writers store `<attn>.fa_q.scale` and `.offset` from
`FA3HeadQuant` and the reader rebuilds it from them. `FA3DynamicQuant` is a dynamic floating-point branch (FP8 per
token, MXFP8/MXFP4 per block of 32): it holds no tensor, quantizes what it receives at run time, and is written as the
per-attention `quant_type` string alone (the reader rebuilds it from that string).
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.quantizer.fa3 import DYNAMIC_FLOAT, HeadRange, fake_quantize_heads

BRANCHES = ("fa_q", "fa_k", "fa_v")  # the attention's children, in the order Q, K, V


class FA3HeadQuant(nn.Module):
    """x [batch, heads, tokens, dim] -> int8 per head and back (scale only), as the attention kernel reads it.
    Buffers: `scale` fp32 [heads, 1], `offset` zeros [heads, 1] (int8 for the INT8 type, as saved)."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        if scale.dim() != 2 or scale.shape[1] != 1 or scale.shape != offset.shape:
            raise ValueError(f"FA3 scale and offset must be [heads, 1] of one shape, got {list(scale.shape)} and "
                             f"{list(offset.shape)}")
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", offset.to(torch.int8))

    @property
    def heads(self) -> int:
        return self.scale.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.heads:
            raise ValueError(f"FA3 tensor {list(x.shape)} has {x.shape[1]} heads, the scales {self.heads}")
        return fake_quantize_heads(x, self.scale)

    def extra_repr(self) -> str:
        return f"FA3 int8 per head, heads={self.heads}"


class FA3Observer(nn.Module):
    """The placeholder during calibration: records the branch's per-head min/max, passes x through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.range = HeadRange()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.range.update(x)
        return x


class FA3DynamicQuant(nn.Module):
    """x [batch, heads, tokens, dim] -> fp8_e4m3 per token (and head), or mxfp8/mxfp4 per block of 32 along dim, and
    back, as the attention kernel quantizes it at run time (quantizer/fa3.py). No buffers: nothing is saved."""

    def __init__(self, dtype: str, scope: str) -> None:
        super().__init__()
        if (dtype, scope) not in DYNAMIC_FLOAT:
            raise ValueError(f"FA3 has no dynamic floating-point branch {dtype}/{scope}; the ones there are: "
                             f"{', '.join(f'{d}/{s}' for d, s in DYNAMIC_FLOAT)}")
        self.dtype, self.scope = dtype, scope
        self._quantize = DYNAMIC_FLOAT[dtype, scope]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x)

    def extra_repr(self) -> str:
        return f"FA3 {self.dtype} {self.scope}, dynamic"
