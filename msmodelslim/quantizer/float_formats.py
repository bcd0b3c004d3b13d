"""Floating-point element formats and the microscaling (MX) shared scale, as pure tensor functions.

Element formats (OCP 8-bit Floating Point spec; OCP Microscaling Formats (MX) v1.0 spec):
- FP8 E4M3 ("fn": no infinities, one NaN code): max normal 448, smallest subnormal 2^-9. torch's
  `float8_e4m3fn` cast rounds to nearest, ties to even; we saturate before casting so nothing becomes NaN.
- FP4 E2M1: the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; a 4-bit code is sign (bit 3) | index of the magnitude
  (bits 0-2). torch has no such dtype, so rounding is written out below.

MX shared scale (E8M0, one per block of 32 along the reduction axis): X = 2^e with
    e = floor(log2(amax_block)) - emax_elem          (emax_elem: 8 for E4M3, 2 for E2M1)
clamped to the E8M0 range [-127, 127] and stored as the byte e + 127. The block's elements are x / X rounded to
nearest-even on the element grid and saturated (amax / X can reach just under 2^(emax_elem+1), above the
largest element, so saturation is part of the format, not an accident).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_E4M3_EMAX = 8  # 448 = 1.75 * 2^8
FP4_E2M1_MAX = 6.0
FP4_E2M1_EMAX = 2  # 6 = 1.5 * 2^2
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # indexed by the code's low three bits
MX_BLOCK = 32
E8M0_BIAS = 127


# ---- FP8 E4M3 ----------------------------------------------------------------------------------------------
def to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) as float8_e4m3fn: saturated to ±448, then rounded to nearest-even."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def round_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The nearest E4M3 value (saturating), in float32."""
    return to_fp8_e4m3(x).float()


# ---- FP4 E2M1 ----------------------------------------------------------------------------------------------
def round_fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 value (ties to the even code, saturating at ±6), in float32.

    The grid's step is 0.5 below 2, 1 in [2, 4) and 2 from 4 on; rounding |x|/step half-to-even (torch.round)
    is round-to-nearest-even on the mantissa bit, and a value just under a binade edge that rounds up lands on
    the edge, which is the next binade's first value: the same answer."""
    x = x.float()
    magnitude = x.abs().clamp(max=FP4_E2M1_MAX)
    step = fp4_e2m1_step(magnitude)
    return torch.copysign(torch.round(magnitude / step) * step, x)


def fp4_e2m1_step(magnitude: torch.Tensor) -> torch.Tensor:
    """The E2M1 grid's step at |x| = magnitude: 0.5 below 2, 1 in [2, 4), 2 from 4 on."""
    return torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))


def encode_fp4_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values (already on the grid) -> uint8 codes 0..15 (bit 3 the sign)."""
    magnitude = values.abs()
    index = torch.zeros_like(magnitude, dtype=torch.uint8)
    for i, m in enumerate(FP4_E2M1_MAGNITUDES):
        index[magnitude == m] = i
    if not bool(torch.isin(magnitude, torch.tensor(FP4_E2M1_MAGNITUDES, device=values.device)).all()):
        raise ValueError("encode_fp4_e2m1 needs values on the E2M1 grid (round them first)")
    sign = (torch.signbit(values) & (magnitude > 0)).to(torch.uint8) << 3  # -0 is stored as +0
    return sign | index


def decode_fp4_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values."""
    table = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    magnitude = table[c & 0x7]
    return torch.where((c & 0x8) != 0, -magnitude, magnitude)


def pack_fp4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] uint8: element 2j in the low nibble, 2j+1 in the high (formats.md A.4.10)."""
    if codes.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of elements along the reduction axis")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4_pairs`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


# ---- element formats by name -------------------------------------------------------------------------------
# name: (round to the grid, largest value, exponent of the largest binade)
ELEMENTS = {
    "fp8_e4m3": (round_fp8_e4m3, FP8_E4M3_MAX, FP8_E4M3_EMAX),
    "fp4_e2m1": (round_fp4_e2m1, FP4_E2M1_MAX, FP4_E2M1_EMAX),
}


# ---- MX: shared E8M0 exponent ------------------------------------------------------------------------------
def shared_exponent(amax: torch.Tensor, element_emax: int) -> torch.Tensor:
    """The MX block exponent e = floor(log2(amax)) - element_emax, clamped to E8M0's [-127, 127] (int32).

    floor(log2) is taken from frexp, exact for every float (log2 rounds near powers of two); an all-zero block
    gets the smallest scale, which represents its zeros exactly."""
    _, exponent = torch.frexp(amax.float())  # amax = m * 2^exponent, m in [0.5, 1)
    e = exponent.to(torch.int32) - 1 - element_emax
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def power_of_two(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 (exact for e in [-149, 127])."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.to(torch.int32))


def e8m0_to_scale(byte: torch.Tensor) -> torch.Tensor:
    """Stored E8M0 byte u -> the float32 scale 2^(u - 127)."""
    return power_of_two(byte.to(torch.int32) - E8M0_BIAS)


def scale_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """A power-of-two float32 scale -> its E8M0 byte (ValueError for any other value)."""
    mantissa, exponent = torch.frexp(scale.float())
    if not bool((mantissa == 0.5).all()):
        raise ValueError("MX scales must be powers of two")
    byte = exponent.to(torch.int32) - 1 + E8M0_BIAS
    if not bool(((byte >= 0) & (byte <= 254)).all()):
        raise ValueError("MX scale outside the E8M0 range 2^-127 .. 2^127")
    return byte.to(torch.uint8)


def to_blocks(x: torch.Tensor, block: int = MX_BLOCK) -> torch.Tensor:
    """[..., K] -> [..., K/block, block]."""
    if x.shape[-1] % block:
        raise ValueError(f"MX formats need the reduction size ({x.shape[-1]}) to be a multiple of {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def mx_quantize(x: torch.Tensor, element: str, block: int = MX_BLOCK,
                exponent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(elements [..., K] float32 on the element grid, scales [..., K/block] float32 powers of two) along the
    last axis: x ≈ elements * scale of their block. `exponent` [..., K/block] replaces the OCP rule (the MX
    weight methods choose it differently); it is clamped to E8M0's range."""
    round_element, _, emax = ELEMENTS[element]
    blocks = to_blocks(x.float(), block)
    if exponent is None:
        exponent = shared_exponent(blocks.abs().amax(dim=-1), emax)
    scale = power_of_two(exponent.clamp(-E8M0_BIAS, E8M0_BIAS))
    elements = round_element(blocks / scale.unsqueeze(-1))
    return elements.reshape(x.shape), scale


def mx_dequantize(elements: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    block = elements.shape[-1] // scale.shape[-1]
    return (to_blocks(elements.float(), block) * scale.unsqueeze(-1)).reshape(elements.shape)


def mx_fake_quantize(x: torch.Tensor, element: str, block: int = MX_BLOCK) -> torch.Tensor:
    """What a dynamic MX kernel computes from x (e.g. activations quantized per block at run time)."""
    return mx_dequantize(*mx_quantize(x, element, block)).to(x.dtype)


# ---- FP8 with a float32 scale (per channel / per token) ----------------------------------------------------
def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, kept away from zero (an all-zero row quantizes to zeros with any scale)."""
    return (amax.float() / FP8_E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8 (s_t = max|x_t| / 448), as the FP8 dynamic kernels do at run time."""
    scale = fp8_scale(x.float().abs().amax(dim=-1, keepdim=True))
    return (round_fp8_e4m3(x.float() / scale) * scale).to(x.dtype)


# ---- weights of the floating-point schemes ------------------------------------------------------------------
MX_ELEMENT = {"mxfp8": "fp8_e4m3", "mxfp4": "fp4_e2m1"}


def mx_codes(elements: torch.Tensor, dtype: str) -> torch.Tensor:
    """Element values on the grid -> stored codes: float8_e4m3fn for mxfp8 (exact), uint8 E2M1 codes for mxfp4."""
    return elements.to(torch.float8_e4m3fn) if dtype == "mxfp8" else encode_fp4_e2m1(elements)


def quantize_weight_float(w: torch.Tensor, dtype: str,
                          exponent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K], scale [N, n_groups] float32, offset zeros) for dtype fp8_e4m3 (per channel: codes
    float8_e4m3fn, scale amax/448 [N, 1]), mxfp8 (codes float8_e4m3fn, scale 2^e [N, K/32]) or mxfp4 (codes
    uint8 E2M1 0..15, one per element, scale 2^e [N, K/32]); an MX `exponent` [N, K/32] overrides the OCP one."""
    w = w.detach().float()
    if dtype == "fp8_e4m3":
        scale = fp8_scale(w.abs().amax(dim=1, keepdim=True))
        codes = to_fp8_e4m3(w / scale)
    elif dtype in MX_ELEMENT:
        elements, scale = mx_quantize(w, MX_ELEMENT[dtype], exponent=exponent)
        codes = mx_codes(elements, dtype)
    else:
        raise ValueError(f"{dtype!r} is not a floating-point weight dtype")
    return codes, scale, torch.zeros_like(scale)


def code_values(codes: torch.Tensor) -> torch.Tensor:
    """Stored weight codes -> their values in float32: int8 integer codes and float8 values as they are,
    uint8 as E2M1 codes."""
    return decode_fp4_e2m1(codes) if codes.dtype == torch.uint8 else codes.float()
