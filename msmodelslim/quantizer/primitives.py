"""Integer quantization as pure tensor functions.

Conventions used everywhere in the project (they are the ascendv1 / CANN conventions):
    q = clamp(round(x / scale) + offset, qmin, qmax)        (round half to even, as torch.round)
    x ≈ (q - offset) * scale
`offset` is an integer-valued float tensor (0 for symmetric). Symmetric ranges use ±(2^(b-1) - 1) so that
zero maps to zero and the grid is symmetric; the clamp still allows qmin = -2^(b-1).
"""
from __future__ import annotations

import torch


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_offset_from_minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset that map [xmin, xmax] (widened to contain 0) onto the `bits`-bit integer grid."""
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    qmin, qmax = int_range(bits)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (torch.maximum(-xmin, xmax) / qmax).clamp(min=tiny)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (qmax - qmin)).clamp(min=tiny)
    offset = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, offset


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 storage; int4 codes lie in [-8, 7])."""
    qmin, qmax = int_range(bits)
    q = x.to(torch.float32, copy=True)  # one working copy, updated in place: a 7B layer is GBs of float32
    q.div_(scale).round_().add_(offset).clamp_(qmin, qmax)
    return q.to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (q.float() - offset) * scale


def fake_quantize_input(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """A static activation as the serving kernel quantizes it at run time (formats.md A.4.1): the offset is added
    BEFORE rounding, q = clamp(round(x * (1/scale) + offset)). With half-to-even rounding and an odd offset this
    differs from round(x/scale) + offset at exact half steps, so the read-back follows the kernel."""
    qmin, qmax = int_range(bits)
    q = (x.float() * (1.0 / scale) + offset).round_().clamp_(qmin, qmax)
    return ((q - offset) * scale).to(x.dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize: what a kernel's integer path computes, in float."""
    return dequantize(quantize(x, scale, offset, bits), scale, offset).to(x.dtype)


def to_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a [out, in] weight as [out, in/group_size, group_size]; per-channel is one group of size `in`."""
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    if in_features % size:
        raise ValueError(f"group_size {size} does not divide the input size {in_features}")
    return w.reshape(out_features, in_features // size, size)


def quantize_weight_minmax(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest weight quantization with min/max ranges per output channel (or per group).

    Returns (qweight [out, in] int8, scale [out, n_groups] fp32, offset [out, n_groups] fp32); per-channel
    gives n_groups = 1.
    """
    groups = to_groups(w.float(), group_size)
    scale, offset = scale_offset_from_minmax(groups.amin(dim=-1), groups.amax(dim=-1), bits, symmetric)
    q = quantize(groups, scale.unsqueeze(-1), offset.unsqueeze(-1), bits)
    return q.reshape(w.shape), scale, offset


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_weight_minmax`: broadcast [out, n_groups] parameters over their groups."""
    out_features, in_features = qweight.shape
    group = in_features // scale.shape[1]
    groups = qweight.reshape(out_features, scale.shape[1], group)
    return dequantize(groups, scale.unsqueeze(-1), offset.unsqueeze(-1)).reshape(out_features, in_features)


def quantize_per_token_dynamic(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token fake quantization (scale = max|x_t| / qmax), as dynamic-quant kernels do at run time."""
    _, qmax = int_range(bits)
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    return fake_quantize(x, scale, torch.zeros_like(scale), bits)


def all_finite(tensor: torch.Tensor, chunk: int = 2**24) -> bool:
    """No NaN/Inf (True for integer tensors). Checked in chunks, so a large embedding needs no same-sized
    temporary; float8 chunks are widened since torch has no isfinite for them."""
    if not tensor.is_floating_point():
        return True
    for part in tensor.reshape(-1).split(chunk):
        if not bool(torch.isfinite(part.float() if part.element_size() == 1 else part).all()):
            return False
    return True
