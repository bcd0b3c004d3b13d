"""`dualscale` (W4A4_MXFP4_DUALSCALE): MXFP4 under a second, coarser float32 scale.

The established tool's two-level scheme for 4-bit weights and activations (its docs: "DualScale: w4a4"), meant
for inputs whose channels differ by orders of magnitude, where one E8M0 exponent per 32 elements is not enough.
Along the reduction axis, per block of D = `dual_block_size` elements (e.g. 512; a layer narrower than D is one
block):

    S_dual = max|x_block| / 6                      float32, no rounding (6: the E2M1 maximum)
    x'     = x / S_dual                            the block's largest value becomes 6
    q, 2^e = MXFP4 of x' (blocks of 32, the minmax shared exponent of quantizer/float_formats.py: the OCP
             floor(log2 amax) - 2; the established tool's MXFP4 minmax takes floor(log2(amax·8/7 + 9.6e-7)) - 2
             and rounds elements half away from zero, so codes can differ where a block's amax lies in the top
             eighth of a binade)
    x_hat  = q · 2^e · S_dual

Weights are quantized so once and stored as the MXFP4 tensors plus `weight_dual_scale` (float32 [N, K/D, 1],
the established writer's shape); activations are quantized the same way at run time, per token, with the same
D. An all-zero block gets S_dual = 1 (the established tool divides 0 by 0 there; any scale represents zeros).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.float_formats import FP4_E2M1_MAX, encode_fp4_e2m1, mx_dequantize, mx_quantize

DEFAULT_DUAL_BLOCK = 512  # the established recipes' value (for the error message only: the key is required)


def dual_blocks(k: int, dual_block_size: int) -> int:
    """How many dual blocks an input of size k has (one when k <= D)."""
    return -(-k // dual_block_size)


def _per_block(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[..., K] -> [..., n_blocks, K / n_blocks] (the caller made K a multiple of n_blocks)."""
    return x.reshape(*x.shape[:-1], n_blocks, x.shape[-1] // n_blocks)


def effective_dual_block(k: int, dual_block_size: int) -> int:
    """The block that the stored scales imply: D, or k when the layer is one block. ValueError when D neither
    divides k nor exceeds it: the checkpoint does not record D, so a reader could not tell such blocks apart."""
    if k <= dual_block_size:
        return k
    if k % dual_block_size:
        raise ValueError(f"dual_block_size {dual_block_size} must divide the input size {k} (or exceed it)")
    return dual_block_size


def dual_scale(x: torch.Tensor, block: int) -> torch.Tensor:
    """S_dual [..., K/block] = max|x| per block / 6, 1 for an all-zero block."""
    amax = _per_block(x.float(), x.shape[-1] // block).abs().amax(dim=-1)
    return torch.where(amax > 0, amax / FP4_E2M1_MAX, torch.ones_like(amax))


def expand_dual(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[..., n] per-block scales -> [..., k], each repeated over its block."""
    return scale.repeat_interleave(k // scale.shape[-1], dim=-1)


def quantize_weight_dualscale(w: torch.Tensor, dual_block_size: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 codes uint8 [N, K], E8M0 scales as float32 powers of two [N, K/32], S_dual float32 [N, K/D])."""
    w = w.detach().float()
    s_dual = dual_scale(w, effective_dual_block(w.shape[-1], dual_block_size))
    elements, scale = mx_quantize(w / expand_dual(s_dual, w.shape[-1]), "fp4_e2m1")
    return encode_fp4_e2m1(elements), scale, s_dual


def dequantize_dualscale(values: torch.Tensor, scale: torch.Tensor, s_dual: torch.Tensor) -> torch.Tensor:
    """Element values [N, K] -> the weight the kernel multiplies with: values · 2^e · S_dual."""
    return mx_dequantize(values, scale) * expand_dual(s_dual, values.shape[-1])


def fake_quantize_act_dualscale(x: torch.Tensor, dual_block_size: int) -> torch.Tensor:
    """What the kernel does to an input at run time: S_dual per token and block, MXFP4 of x / S_dual, times S_dual."""
    k = x.shape[-1]
    s_dual = expand_dual(dual_scale(x, effective_dual_block(k, dual_block_size)), k)
    scaled = x.float() / s_dual
    return (mx_dequantize(*mx_quantize(scaled, "fp4_e2m1")) * s_dual).to(x.dtype)
