"""Integer quantization as pure tensor functions.

Conventions used everywhere in the project (they are the ascendv1 / CANN conventions):
    q = clamp(round(x / scale) + offset, qmin, qmax)        (round half to even, as torch.round)
    x ≈ (q - offset) * scale
`offset` is an integer-valued float tensor (0 for symmetric). Symmetric ranges use ±(2^(b-1) - 1) so that
zero maps to zero and the grid is symmetric; the clamp still allows qmin = -2^(b-1).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from msmodelslim.core.memory import empty_on_huge_pages


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
    q = x.to(torch.float32, copy=True)  # one working copy, updated in place: a 7B layer is GBs of float32
    return _codes_in_place(q, scale, offset, bits).to(torch.int8)


def _codes_in_place(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """q <- clamp(round(q / scale) + offset): float32 codes, in q's own memory."""
    qmin, qmax = int_range(bits)
    return q.div_(scale).round_().add_(offset).clamp_(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (q.float() - offset) * scale


def fake_quantize_input(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """A static activation as the serving kernel quantizes it at run time (formats.md A.4.1): the offset is added
    BEFORE rounding, q = clamp(round(x * (1/scale) + offset)). With half-to-even rounding and an odd offset this
    differs from round(x/scale) + offset at exact half steps, so the read-back follows the kernel."""
    qmin, qmax = int_range(bits)
    q = x.float().mul(1.0 / scale).add_(offset).round_().clamp_(qmin, qmax)  # one buffer, updated in place
    return q.sub_(offset).mul_(scale).to(x.dtype)


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
    groups = to_groups(w, group_size)  # min and max in w's own dtype: exact, as widening is monotone
    scale, offset = scale_offset_from_minmax(groups.amin(dim=-1), groups.amax(dim=-1), bits, symmetric)
    q = quantize_in_row_chunks(groups, scale.unsqueeze(-1), offset.unsqueeze(-1), bits)
    return q.reshape(w.shape), scale, offset


CHUNK_BYTES = 1 << 20  # float32 work per chunk: small enough to stay in a core's cache between the passes


def quantize_in_row_chunks(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                           chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """`quantize` with x, scale and offset sharing their leading (row) dimension, a few rows at a time.

    The same float32 operations on every element, so the same codes; but the passes (widen, divide, round,
    clamp, narrow) run over one cache-sized float32 chunk, reused, instead of each streaming a full-size
    float32 copy through memory (a 7B MLP weight is 180 MB in float32). x may be bf16/fp16: it is widened
    chunk by chunk. The loop runs on one thread: each pass over a chunk is too short to share, and a thread
    team waiting at every pass for a member the OS has descheduled made it 5-10x slower on a busy 2-core
    machine (11008 x 4096: 45 ms on one thread against 0.1-1 s on two)."""
    if x.device.type != "cpu":  # accelerators: one kernel per pass over the whole tensor, on its own device
        return quantize(x, scale, offset, bits)
    out = empty_on_huge_pages(x.shape, torch.int8)  # a fresh mapping: 2 MiB pages fault in faster (core/memory.py)
    row_bytes = max(1, x[0].numel() * 4) if len(x) else 1
    rows = max(1, chunk_bytes // row_bytes)
    work = torch.empty((min(rows, len(x)),) + tuple(x.shape[1:]), dtype=torch.float32)
    with one_thread():
        for start in range(0, len(x), rows):
            part = slice(start, start + rows)
            q = work[: len(x[part])].copy_(x[part])
            out[part].copy_(_codes_in_place(q, scale[part], offset[part], bits))
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op parallelism off for the block (restored after)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_weight_minmax`: broadcast [out, n_groups] parameters over their groups."""
    out_features, in_features = qweight.shape
    group = in_features // scale.shape[1]
    groups = qweight.reshape(out_features, scale.shape[1], group)
    return dequantize(groups, scale.unsqueeze(-1), offset.unsqueeze(-1)).reshape(out_features, in_features)


def per_token_codes(x: torch.Tensor, bits: int,
                    clip_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization as the kernels do it at run time: s_t = max|x_t| / qmax (times
    `clip_ratio` when given: FlatQuant's clipped range) and codes clamp(round(x / s_t)), returned as (float32
    integer codes, float32 scales [..., 1]). Four passes over x; abs().amax because torch's vector_norm(ord=inf)
    gives the same max 6x slower on CPU (measured, 512 x 1536)."""
    qmin, qmax = int_range(bits)
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    if clip_ratio is not None:
        amax = amax * clip_ratio.float()
    scale = (amax / qmax).clamp_(min=torch.finfo(torch.float32).tiny)
    return x32.div(scale).round_().clamp_(qmin, qmax), scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity's gradient backward (the straight-through estimator of learned rounding)."""
    return x + (torch.round(x) - x).detach()


def quantize_per_token_dynamic(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token fake quantization: the same values as `fake_quantize(x, s_t, 0, bits)` without its int8
    round trip (the codes are exact integers in float32); it runs on every dynamic layer's input at read-back."""
    codes, scale = per_token_codes(x, bits)
    return codes.mul_(scale).to(x.dtype)


def all_finite(tensor: torch.Tensor, chunk: int = 2**24) -> bool:
    """No NaN/Inf (True for integer tensors). Checked in chunks, so a large embedding needs no same-sized
    temporary; float8 chunks are widened since torch has no isfinite for them."""
    if not tensor.is_floating_point():
        return True
    if tensor.element_size() > 1 and bool(torch.isfinite(tensor.sum())):
        # Exact, and one fast pass (a 7B MLP weight in bf16: 4 ms against 140 ms element by element): under IEEE
        # arithmetic a NaN or ±Inf anywhere makes any sum of the values NaN or ±Inf. Only the converse fails
        # (finite values may overflow the sum), so a non-finite sum is settled element by element below.
        return True
    for part in tensor.reshape(-1).split(chunk):
        if not bool(torch.isfinite(part.float() if part.element_size() == 1 else part).all()):
            return False
    return True
