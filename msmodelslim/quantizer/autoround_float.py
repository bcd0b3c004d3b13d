"""AutoRound on the floating-point grids: FP8 E4M3 per channel, MXFP8 and MXFP4 (blocks of 32, E8M0 scales).

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023, with
the integer grid (quantizer/autoround.py) replaced by the element grid. A float grid's step grows with the
value, so the rounding offset V ∈ [−0.5, 0.5] is counted in steps of the grid where the value lies; as on an
integer grid, V = ±0.5 reaches the neighbouring grid point:

    y  = W / s
    Ŵ  = s · R(y + V · δ(y))          R: nearest element value, saturating (straight-through gradient)
                                       δ(y): the grid's step at |y| (0.5 / 1 / 2 for E2M1; 2^(⌊log2|y|⌋−3) for E4M3)

and the scale is tuned through one factor a per scale:

    FP8 per channel:  s = a · max|W_row| / 448,               a ∈ [0.5, 1]  (clipping, as on the integer grid)
    MX per block:     s = 2^(⌊log2(a · amax_block)⌋ − emax),  a ∈ [0.5, 2]  (⌊·⌋ with a straight-through gradient)

For MX, a moves the block's power-of-two scale one step down (clip more, finer grid) or up (clip nothing,
coarser grid); a = 1 is the OCP rule. The loss is the layer output's mean squared error on its calibration
inputs (quantized as the kernel quantizes them); step 0 is round to nearest with the `minmax` scales and the
best step is kept, so on those rows the result never loses to `minmax`.
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.autoround import AutoRoundSettings, signed_descent
from msmodelslim.quantizer.float_formats import (E8M0_BIAS, ELEMENTS, MX_BLOCK, MX_ELEMENT, fp4_e2m1_step, fp8_scale,
                                                 mx_codes, to_blocks, to_fp8_e4m3)

FP8_MIN_STEP = 2.0 ** -9  # E4M3's subnormal step
FP8_MANTISSA_BITS = 3


def element_step(y: torch.Tensor, element: str) -> torch.Tensor:
    """The spacing of the element grid at |y| (the step between the grid points around it)."""
    magnitude = y.abs()
    if element == "fp4_e2m1":
        return fp4_e2m1_step(magnitude)
    _, exponent = torch.frexp(magnitude)  # |y| = m · 2^exponent, m ∈ [0.5, 1): ⌊log2|y|⌋ = exponent − 1
    step = torch.ldexp(torch.ones_like(magnitude), (exponent - 1 - FP8_MANTISSA_BITS).to(torch.int32))
    return step.clamp(min=FP8_MIN_STEP)


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return value + (rounded - value).detach()


def _scales(w: torch.Tensor, dtype: str, a: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale per row [N, 1] (fp8_e4m3) or per block [N, K/32] (MX) for factors `a` of the same shape."""
    if dtype == "fp8_e4m3":
        scale = fp8_scale(w.abs().amax(dim=1, keepdim=True)) * a
        return _straight_through(scale, scale.detach().to(scale_dtype).float())  # what the stored scale holds
    emax = ELEMENTS[MX_ELEMENT[dtype]][2]
    scaled_amax = to_blocks(w, MX_BLOCK).abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) * a
    _, frexp_exponent = torch.frexp(scaled_amax.detach())  # ⌊log2⌋ exactly (log2 rounds near powers of two)
    floor_log2 = _straight_through(torch.log2(scaled_amax), (frexp_exponent - 1).float())
    return torch.exp2((floor_log2 - emax).clamp(-E8M0_BIAS, E8M0_BIAS))  # exact: an integer exponent


def _expand(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)


def fake_quantize_float(w: torch.Tensor, v: torch.Tensor, a: torch.Tensor, dtype: str,
                        scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ [N, K], the element values [N, K]) for rounding offsets v [N, K] and scale factors a."""
    element = MX_ELEMENT.get(dtype, "fp8_e4m3")
    round_element, largest, _ = ELEMENTS[element]
    scale = _expand(_scales(w, dtype, a, scale_dtype), w)
    y = w / scale
    shifted = y + v * element_step(y.detach(), element)
    # saturation keeps its true gradient (a clipped value moves with s), rounding passes the gradient through
    elements = _straight_through(shifted.clamp(-largest, largest), round_element(shifted.detach()))
    return elements * scale, elements


def _factors_shape(w: torch.Tensor, dtype: str) -> tuple[int, int]:
    return (w.shape[0], 1) if dtype == "fp8_e4m3" else (w.shape[0], w.shape[1] // MX_BLOCK)


def autoround_quantize_float(w: torch.Tensor, x: torch.Tensor, x_quantized: torch.Tensor, dtype: str,
                             settings: AutoRoundSettings):
    """(codes [N, K], scale float32 [N, 1] or [N, K/32], offset zeros, the best loss, the step-0 loss) for dtype
    fp8_e4m3 (codes float8_e4m3fn), mxfp8 (float8_e4m3fn) or mxfp4 (uint8 E2M1 codes); `x` are float input rows
    [n, K], `x_quantized` the same rows as the kernel quantizes them."""
    w = w.detach().float()
    reference = x.float() @ w.T
    xq = x_quantized.float()
    v = torch.zeros_like(w, requires_grad=settings.tune_rounding)
    a = torch.ones(_factors_shape(w, dtype), requires_grad=settings.tune_range)
    high = 1.0 if dtype == "fp8_e4m3" else 2.0

    def loss_of() -> torch.Tensor:
        return (xq @ fake_quantize_float(w, v, a, dtype, settings.scale_dtype)[0].T - reference).pow(2).mean()

    loss, first, (v, a) = signed_descent(loss_of, [v, a], [(-0.5, 0.5), (0.5, high)], settings)
    with torch.no_grad():
        elements = fake_quantize_float(w, v, a, dtype, settings.scale_dtype)[1]
        scale = _scales(w, dtype, a, settings.scale_dtype).float()
    codes = to_fp8_e4m3(elements) if dtype == "fp8_e4m3" else mx_codes(elements, dtype)
    return codes, scale, torch.zeros_like(scale), loss, first

