"""NVFP4: E2M1 elements in blocks of 16 along the reduction axis, an FP8 E4M3 scale per block, and one float32
global scale per tensor (NVIDIA Blackwell's FP4 format), in compressed-tensors' convention (formats.md B.3, B.5),
so that its `nvfp4-pack-quantized` checkpoints decompress to exactly our weights:

    g      = 448 · 6 / max|W|                     float32 [1], stored as `weight_global_scale` (1 if W is all zero)
    s_b    = e4m3(g · (max|W_b| / 6))             per block of 16, stored as `weight_scale` float8_e4m3fn;
                                                  an s_b that rounds to 0 becomes 0.125 (the library's FP8 epsilon)
    q      = e2m1(W / (s_b / g))                  nearest-even, saturating at ±6
    W_hat  = q · (s_b / g)

W4A4 (vLLM's W4A4Fp4): the input gets the same treatment at run time, per token and block of 16, under a global
input scale `input_global_scale` = 448·6 / max|x| over the calibration data (llm-compressor's static_minmax).

g stretches the per-tensor range so that the block scales use FP8's range; the block with the tensor's largest
value gets s_b = 448. Layers that an engine fuses (q/k/v, gate/up) share one g, the largest max|W| of the group
(llm-compressor does the same: vLLM keeps one global scale per fused layer).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.float_formats import (FP4_E2M1_MAX, FP8_E4M3_MAX, encode_fp4_e2m1, round_fp4_e2m1,
                                                 round_fp8_e4m3, to_blocks)

NVFP4_BLOCK = 16
ZERO_SCALE = 0.125  # what the library puts for a block scale that is 0 in FP8


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """g = 448 · 6 / amax as float32 [1]; 1 when amax is 0 (nothing to scale) or not finite."""
    amax = torch.as_tensor(amax, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    g = FP8_E4M3_MAX * FP4_E2M1_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def block_scales(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """s_b [..., K/16] float32 holding E4M3 values: e4m3(g · max|W_b| / 6), zeros replaced by 0.125."""
    amax = to_blocks(w.float(), NVFP4_BLOCK).abs().amax(dim=-1)
    s = round_fp8_e4m3(g * (amax / FP4_E2M1_MAX))
    return torch.where(s == 0, torch.full_like(s, ZERO_SCALE), s)


def effective_scale(block_scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """s_b / g, the float32 factor of each block's elements (the division the decompressor does)."""
    return block_scale.float() / g.float()


def expand_blocks(scale: torch.Tensor) -> torch.Tensor:
    return scale.repeat_interleave(NVFP4_BLOCK, dim=-1)


def round_to_blocks(w: torch.Tensor, block_scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E2M1 element values of w under these scales."""
    return round_fp4_e2m1(w.float() / expand_blocks(effective_scale(block_scale, g)))


def quantize_weight_nvfp4(w: torch.Tensor, amax: torch.Tensor | float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 codes uint8 [N, K], block scales float32 [N, K/16] (E4M3 values), global scale float32 [1]) by
    round to nearest; `amax` is the max|W| the global scale comes from (a fused group's), default this weight's."""
    w = w.detach().float()
    g = global_scale(w.abs().max() if amax is None else amax)
    s = block_scales(w, g)
    return encode_fp4_e2m1(round_to_blocks(w, s, g)), s, g


def fake_quantize_act_nvfp4(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What the W4A4 kernel does to an input at run time: per 16 inputs of a token, the block scale under the
    calibrated global input scale g (`input_global_scale`, 448·6 / max|x| over the calibration data), then E2M1."""
    s = block_scales(x, g)
    return (round_to_blocks(x, s, g) * expand_blocks(effective_scale(s, g))).to(x.dtype)


def dequantize_nvfp4(values: torch.Tensor, block_scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Element values [N, K] -> q · (s_b / g)."""
    return values.float() * expand_blocks(effective_scale(block_scale, g))
