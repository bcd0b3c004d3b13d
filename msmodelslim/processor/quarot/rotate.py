"""The weight rewrites of an offline rotation, as pure in-place functions on weight tensors (row-vector
convention: a linear computes y = x·Wᵀ + b with W of shape [out, in]; a router's weight [E, H] is read the
same way).

Rotating the residual stream h → h·Q (Q orthogonal) is exact when every reader and writer compensates:
- a reader (y = h·Wᵀ) becomes W·Q, since (h·Q)·(W·Q)ᵀ = h·Wᵀ;
- a writer (adds y to h) becomes Qᵀ·W and b·Q, so that its output arrives rotated;
- the embedding table E becomes E·Q.
RMSNorm commutes with Q only without its weight (‖h·Q‖ = ‖h‖), so each norm's gain g is first folded into
its readers (W·diag(g)) and set to 1.

`rotate_block` applies a `RotationStructure` to one decoder block given as {name relative to the block:
tensor}; the processor passes a block's parameters, the multi-token-prediction code a checkpoint's tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from msmodelslim.core.errors import ProcessingError
from msmodelslim.model.interface import AttentionShape, MlaShape
from msmodelslim.model.rotation import RotationStructure


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 (the working precision) unless the weights are float64 already: float64 would cost minutes per
    # layer on 7B-sized weights
    return torch.promote_types(t.dtype, torch.float32)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    device = a.device if a.device.type != "cpu" else b.device
    dtype = _work_dtype(a)
    return (a.to(device, dtype) @ b.to(device, dtype)).to(a.dtype)


@torch.no_grad()
def fold_norm(gain: torch.Tensor, readers: Iterable[torch.Tensor]) -> None:
    """W → W·diag(g) for every reader weight W [out, in] of a norm with gain g [in]."""
    for weight in readers:
        weight.mul_(gain.to(weight.dtype).unsqueeze(0))


@torch.no_grad()
def rotate_reader(weight: torch.Tensor, q: torch.Tensor) -> None:
    """W → W·Q: a reader of the rotated stream (also the embedding table, E → E·Q)."""
    weight.copy_(_matmul(weight, q))


@torch.no_grad()
def rotate_writer(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor) -> None:
    """W → Qᵀ·W and b → b·Q: a writer into the rotated stream."""
    weight.copy_(_matmul(q.T, weight))
    if bias is not None:
        bias.copy_(_matmul(bias.unsqueeze(0), q).squeeze(0))


@torch.no_grad()
def rotate_stream_reader(weight: torch.Tensor, q: torch.Tensor) -> None:
    """W → W·diag(Q, …, Q): a weight [out, n·H] reading n rotated residual streams side by side (hyper-connections)."""
    hidden = q.shape[0]
    if weight.dim() != 2 or weight.shape[1] % hidden:
        raise ProcessingError(f"quarot: a hyper-connection weight {list(weight.shape)} does not read whole streams of "
                              f"the hidden size {hidden}")
    streams = weight.view(weight.shape[0], weight.shape[1] // hidden, hidden)
    streams.copy_(torch.einsum("osh,hk->osk", streams.to(_work_dtype(weight)), q.to(weight.device, _work_dtype(weight)))
                  .to(weight.dtype))


@dataclass(frozen=True)
class ValueHeads:
    """Where the value heads sit. The value weight viewed [value_heads, rows_per_head, in] holds each head's
    value rows at [offset, offset + head_dim); the output weight's columns are [output_heads, head_dim]."""

    value_heads: int
    rows_per_head: int
    offset: int
    head_dim: int
    output_heads: int

    @classmethod
    def gqa(cls, shape: AttentionShape) -> "ValueHeads":
        return cls(shape.num_kv_heads, shape.head_dim, 0, shape.head_dim, shape.num_heads)

    @classmethod
    def mla(cls, shape: MlaShape) -> "ValueHeads":
        """kv_b_proj rows per head: [qk_nope_head_dim K rows; v_head_dim V rows]; only the V rows rotate."""
        return cls(shape.num_heads, shape.qk_nope_head_dim + shape.v_head_dim, shape.qk_nope_head_dim,
                   shape.v_head_dim, shape.num_heads)


@torch.no_grad()
def rotate_value_heads(value: torch.Tensor, value_bias: torch.Tensor | None, output: torch.Tensor, h: torch.Tensor,
                       heads: ValueHeads) -> None:
    """Per-head rotation of the attention values: each value head v_k → v_k·H (its rows Hᵀ·W_k, bias b_k·H),
    and each head's output columns W_o[:, head] → W_o[:, head]·H. Attention mixes tokens, not channels, so
    (A·V·H)·(W_o·H)ᵀ = A·V·W_oᵀ per head, also when several query heads share a value head."""
    d, lo, dtype = heads.head_dim, heads.offset, _work_dtype(value)
    h = h.to(value.device, dtype)
    rows = value.view(heads.value_heads, heads.rows_per_head, -1)[:, lo : lo + d]
    rows.copy_(torch.einsum("ji,kjc->kic", h, rows.to(dtype)).to(rows.dtype))
    if value_bias is not None:
        b = value_bias.view(heads.value_heads, heads.rows_per_head)[:, lo : lo + d]
        b.copy_((b.to(dtype) @ h).to(b.dtype))
    o = output.view(output.shape[0], heads.output_heads, d)
    o.copy_(torch.einsum("rkj,ji->rki", o.to(dtype), h.to(o.device)).to(o.dtype))


# ---- a whole block -------------------------------------------------------------------------------------------
def pattern_regex(pattern: str) -> re.Pattern:
    """A structure name as a regex: `*` is one name component (an expert index)."""
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def matching(names: Iterable[str], pattern: str) -> list[str]:
    regex = pattern_regex(pattern)
    return [n for n in names if regex.fullmatch(n)]


def _weights(tensors: Mapping[str, torch.Tensor], patterns: Iterable[str]) -> list[str]:
    """The `.weight` tensor names of the modules these patterns name (absent modules: none), in order."""
    found: list[str] = []
    for pattern in patterns:
        found += [n for n in matching(tensors, f"{pattern}.weight") if n not in found]
    return found


HeadRotations = Mapping[str, tuple[ValueHeads, torch.Tensor]]  # layout ("gqa"/"mla") -> (where, H)


@torch.no_grad()
def rotate_block(tensors: Mapping[str, torch.Tensor], structure: RotationStructure, q: torch.Tensor,
                 heads: HeadRotations) -> set[str]:
    """Rotate one decoder block in place: fold each norm into its readers and rotate their columns, rotate the
    writers' rows, rotate the value heads. `tensors` maps names relative to the block to the tensors to
    rewrite; modules the structure names but the block lacks are skipped (dense vs MoE layers). Returns the
    names of the weights it rotated."""
    done: set[str] = set()
    for norm, readers in structure.norm_readers:
        gain_name = f"{norm}.weight"
        if gain_name not in tensors:
            continue
        reader_names = _weights(tensors, readers)
        if not reader_names:
            raise ProcessingError(f"quarot: none of the readers of {norm} ({', '.join(readers)}) is in the block; "
                                  f"the rotation structure does not describe this block")
        gain = tensors[gain_name]
        fold_norm(gain.float() + structure.norm_offset, (tensors[n] for n in reader_names))
        gain.fill_(1.0 - structure.norm_offset)
        for name in reader_names:
            rotate_reader(tensors[name], q)
        done.update(reader_names)
    for name in _weights(tensors, structure.writers):
        rotate_writer(tensors[name], tensors.get(name.removesuffix("weight") + "bias"), q)
        done.add(name)
    for name in structure.stream_readers:  # parameters, not modules: exact names
        if name in tensors:
            rotate_stream_reader(tensors[name], q)
            done.add(name)
    for head in structure.heads:
        value, output = tensors.get(f"{head.value}.weight"), tensors.get(f"{head.output}.weight")
        if value is None and output is None:
            continue
        if value is None or output is None:
            raise ProcessingError(f"quarot: the block has only one of {head.value} and {head.output}; their "
                                  f"value heads rotate together")
        where, h = heads[head.layout]
        rotate_value_heads(value, tensors.get(f"{head.value}.bias"), output, h, where)
        done.update((f"{head.value}.weight", f"{head.output}.weight"))
    return done
