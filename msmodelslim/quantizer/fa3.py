"""FA3 attention quantization as tensor functions: per-head ranges of the attention's Q, K and V, their static
int8 scales, and what the attention kernel computes with them (formats.md A.6, implementation_notes (3)).

An attention tensor is [batch, heads, tokens, dim]; head h has one scale, fp32 [heads, 1] as saved:

    q[h] = clamp(round(x[h] / s[h]), -128, 127)        x̂[h] = q[h] · s[h]
    s[h] = max(|min_h|, |max_h|) / 127                 (symmetric minmax over every calibration token; offset 0)

The offset is saved as zeros and never read: the engine dequantizes with the scale alone, as C8 does.

The dynamic floating-point branches calibrate nothing: the kernel quantizes Q, K, V as they arrive, along the last
axis (head_dim; MLA: the latent r + rope), the element and shared-scale rules being those of
quantizer/float_formats.py (OCP FP8 and MX v1.0 specs):

    fp8_e4m3 per_token:   s = max|x[b, h, t, :]| / 448 per token and head,  x̂ = E4M3(x / s) · s   (RNE, saturating)
    mxfp8 / mxfp4 per_block: blocks of 32 along head_dim, X = 2^(floor(log2 amax) - emax) (E8M0),
                          x̂ = element(x / X) · X                       (E4M3 emax 8 / E2M1 emax 2)
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.float_formats import MX_BLOCK, MX_ELEMENT, fp8_fake_quantize_per_token, mx_fake_quantize
from msmodelslim.quantizer.kv_cache import CacheChannelRange
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


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, tokens, head_dim] -> FP8 E4M3 with one scale max|x|/448 per token and head, and back."""
    return fp8_fake_quantize_per_token(x)


def fake_quantize_mx_per_block(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x [batch, heads, tokens, head_dim] -> `dtype` ("mxfp8": E4M3 elements, "mxfp4": E2M1) in blocks of 32 along
    head_dim with an E8M0 shared scale each, and back (ValueError when head_dim is not a multiple of 32)."""
    if dtype not in MX_ELEMENT:
        raise ValueError(f"{dtype!r} is not an MX dtype; use one of {', '.join(MX_ELEMENT)}")
    return mx_fake_quantize(x, MX_ELEMENT[dtype], MX_BLOCK)


# (dtype, scope) of a dynamic floating-point branch -> what the kernel computes from x at run time
DYNAMIC_FLOAT = {
    ("fp8_e4m3", "per_token"): fake_quantize_fp8_per_token,
    ("mxfp8", "per_block"): lambda x: fake_quantize_mx_per_block(x, "mxfp8"),
    ("mxfp4", "per_block"): lambda x: fake_quantize_mx_per_block(x, "mxfp4"),
}


class HeadRange(CacheChannelRange):
    """Running per-head min and max of an attention tensor over every token it sees; the running update and the
    cross-rank merge are C8's (quantizer/kv_cache.py), only the reduction is per head."""

    @staticmethod
    def _extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = x.transpose(0, 1).reshape(x.shape[1], -1)  # [heads, batch·tokens·dim]
        return heads.amin(dim=1), heads.amax(dim=1)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8: scale fp32 [heads, 1], offset zeros [heads, 1]."""
        scale, offset = scale_offset_from_minmax(self.min, self.max, BITS, symmetric=True)
        return scale.reshape(-1, 1), offset.reshape(-1, 1)
