"""QuaRot for a DeepSeek-style multi-token-prediction (MTP) layer, which checkpoints carry as
`model.layers.<num_hidden_layers>.*` but transformers does not build, so it never reaches the runner.

The MTP layer computes, from the main model's hidden state h of token i and the embedding of token i+1,
    h' = eh_proj([enorm(E(t)); hnorm(h)])      eh_proj: [H, 2H], columns [embedding half | hidden half]
    h'' = decoder_layer(h')                     a full decoder block (attention + MoE)
    logits = shared_head.head(shared_head.norm(h''))
and must keep working once the main model's residual stream is rotated (h → h·Q). Each piece is rotated as
its counterpart in the main model:
- E → E·Q (its own copy of the embedding table);
- enorm's and hnorm's gains fold into their halves of eh_proj's columns, and each half rotates (W·Q), since
  each half reads a rotated, unit-gain-normed vector; eh_proj writes h' into the MTP's residual stream, so its
  rows rotate (Qᵀ·W);
- the decoder layer's tensors rotate exactly as a main block (the family's RotationStructure, value heads too);
- shared_head.norm folds into shared_head.head, whose columns rotate.

Which h the engine passes decides whether this is exact. Fed the main model's pre-final-norm residual
stream (as the formula above reads, and as upstream msModelSlim calibrates its MTP), the rotated MTP computes
the same logits as the original in float. An engine that feeds the post-final-norm hidden state n(h)·g
(vLLM does: DeepseekV2Model.forward returns self.norm(hidden_states, residual), which its MTP proposer takes)
sees n(h)·Q after the rotation, because g went into lm_head: no offline rotation can give hnorm back the
norm of n(h)·g. Pass `final_norm_weight` = g (before folding)
for that contract: g/rms(g) is folded into the hidden half, which is exact when g is uniform and otherwise
off by the per-token factor rms(n(h)·g)/rms(g) on the hidden half.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from msmodelslim.core.errors import ProcessingError
from msmodelslim.model.rotation import RotationStructure, StreamMtpRotation
from msmodelslim.processor.quarot import rotate


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, prefix: str) -> torch.Tensor:
    if name not in tensors:
        raise ProcessingError(f"quarot: the multi-token-prediction layer lacks {prefix}{name}")
    return tensors[name]


@torch.no_grad()
def rotate_mtp_layer(tensors: Mapping[str, torch.Tensor], prefix: str, structure: RotationStructure,
                     q: torch.Tensor, heads: rotate.HeadRotations,
                     final_norm_weight: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The MTP layer's tensors rotated consistently with the main model; the input is left as it was.

    tensors: every tensor of one MTP layer, full checkpoint names starting with `prefix` (e.g.
        'model.layers.61.'), float32 and dequantized (block-FP8 `weight_scale_inv` companions are refused).
    structure: the family's RotationStructure (`structure.mtp` names the MTP-only modules; the decoder layer
        inside is rotated by the same norm_readers/writers/heads as a main block).
    q: the residual rotation [H, H] the main model was rotated with; heads: the value-head rotations
        (layout -> (ValueHeads, H)) of the main blocks.
    final_norm_weight: None when the engine feeds the MTP the main model's pre-final-norm hidden state
        (exact); the main final norm's gain before folding when it feeds the post-norm state (see the module
        docstring: approximate unless that gain is uniform).
    Returns {name: tensor} with the same names; norm weights come back as the unit gain.
    """
    names = structure.mtp
    if names is None:
        raise ProcessingError("quarot: the rotation structure describes no multi-token-prediction layer")
    outside = [n for n in tensors if not n.startswith(prefix)]
    if outside:
        raise ProcessingError(f"quarot: {outside[0]} is not a tensor of the MTP layer {prefix}")
    odd = [n for n, t in tensors.items() if not t.is_floating_point() or n.endswith("_scale_inv")]
    if odd:
        raise ProcessingError(f"quarot: MTP tensor {odd[0]} is quantized; dequantize the MTP layer to float first")
    stacked = [n for n, t in tensors.items() if t.dim() > 2]
    if stacked:
        raise ProcessingError(f"quarot: MTP tensor {stacked[0]} is {list(tensors[stacked[0]].shape)}: "
                              f"experts stacked in one tensor are not rotated here; store them per expert")
    out = {n[len(prefix) :]: t.detach().to(torch.float32, copy=True) for n, t in tensors.items()}
    hidden = q.shape[0]

    projection = _tensor(out, f"{names.projection}.weight", prefix)
    if tuple(projection.shape) != (hidden, 2 * hidden):
        raise ProcessingError(f"quarot: {prefix}{names.projection}.weight is {list(projection.shape)}, expected "
                              f"[{hidden}, {2 * hidden}] (embedding half, hidden half)")
    embedding_half, hidden_half = projection[:, :hidden], projection[:, hidden:]  # views into eh_proj
    embedding_norm = _tensor(out, f"{names.embedding_norm}.weight", prefix)
    hidden_norm = _tensor(out, f"{names.hidden_norm}.weight", prefix)
    embedding_gain = embedding_norm + structure.norm_offset
    hidden_gain = hidden_norm + structure.norm_offset
    if final_norm_weight is not None:  # the post-norm contract: fold g/rms(g) in as well
        g = final_norm_weight.float() + structure.norm_offset
        hidden_gain = hidden_gain * g / g.pow(2).mean().sqrt()
    for half, gain in ((embedding_half, embedding_gain), (hidden_half, hidden_gain)):
        rotate.fold_norm(gain, [half])
        rotate.rotate_reader(half, q)
    for norm in (embedding_norm, hidden_norm):
        norm.fill_(1.0 - structure.norm_offset)
    rotate.rotate_writer(projection, out.get(f"{names.projection}.bias"), q)
    done = {f"{names.projection}.weight"}

    head_norm = _tensor(out, f"{names.head_norm}.weight", prefix)
    head = _tensor(out, f"{names.head}.weight", prefix)
    rotate.fold_norm(head_norm + structure.norm_offset, [head])
    head_norm.fill_(1.0 - structure.norm_offset)
    rotate.rotate_reader(head, q)
    embedding = _tensor(out, f"{names.embedding}.weight", prefix)
    rotate.rotate_reader(embedding, q)
    done |= {f"{names.head}.weight", f"{names.embedding}.weight"}

    done |= rotate.rotate_block(out, structure, q, heads)
    missed = [n for n, t in out.items() if t.dim() == 2 and t.shape[1] == hidden and n not in done]
    if missed:
        raise ProcessingError(f"quarot: MTP tensor {prefix}{missed[0]} reads the hidden size but the rotation "
                              f"structure does not name it")
    return {prefix + n: t for n, t in out.items()}


@torch.no_grad()
def rotate_stream_mtp_layers(tensors: Mapping[str, torch.Tensor], prefix: str, structure: RotationStructure,
                             q: torch.Tensor, heads: rotate.HeadRotations) -> dict[str, torch.Tensor]:
    """DeepSeek-V4's multi-token-prediction layers (`<prefix><i>.*`, e.g. 'mtp.0.'), rotated consistently with the
    main model (StreamMtpRotation): norms folded into the projections that read them, e_proj / h_proj rotated as
    readers and writers, the embedding copy and head as readers, the collapse weight per stream, the decoder block as
    a main block. Exact: the engine feeds the main model's pre-collapse streams. Integer tensors stay as they are."""
    names = structure.mtp
    if not isinstance(names, StreamMtpRotation):
        raise ProcessingError("quarot: the rotation structure describes no hyper-connection MTP layer")
    outside = [n for n in tensors if not n.startswith(prefix)]
    if outside:
        raise ProcessingError(f"quarot: {outside[0]} is not a tensor of the MTP layers {prefix}*")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, _, rest = name[len(prefix):].partition(".")
        layers.setdefault(index, {})[rest] = tensor.detach().clone() if not tensor.is_floating_point() \
            else tensor.detach().to(torch.float32, copy=True)
    hidden = q.shape[0]
    not_readers = [rotate.pattern_regex(p) for p in structure.not_readers]
    out = {}
    for index, layer in layers.items():
        where = f"{prefix}{index}."
        done = set()
        for projection, norm in ((names.embedding_projection, names.embedding_norm),
                                 (names.hidden_projection, names.hidden_norm)):
            weight, gain = _tensor(layer, f"{projection}.weight", where), _tensor(layer, f"{norm}.weight", where)
            rotate.fold_norm(gain + structure.norm_offset, [weight])
            gain.fill_(1.0 - structure.norm_offset)
            rotate.rotate_reader(weight, q)
            rotate.rotate_writer(weight, layer.get(f"{projection}.bias"), q)
            done.add(f"{projection}.weight")
        head, head_norm = _tensor(layer, f"{names.head}.weight", where), _tensor(layer, f"{names.head_norm}.weight", where)
        rotate.fold_norm(head_norm + structure.norm_offset, [head])
        head_norm.fill_(1.0 - structure.norm_offset)
        rotate.rotate_reader(head, q)
        rotate.rotate_stream_reader(_tensor(layer, names.head_stream_reader, where), q)
        done |= {f"{names.head}.weight", names.head_stream_reader}
        if f"{names.embedding}.weight" in layer:  # its own copy of the embedding table, where the checkpoint has one
            rotate.rotate_reader(layer[f"{names.embedding}.weight"], q)
            done.add(f"{names.embedding}.weight")
        done |= rotate.rotate_block(layer, structure, q, heads)
        missed = [n for n, t in layer.items() if t.dim() == 2 and t.shape[1] == hidden and n not in done
                  and not any(r.fullmatch(n.removesuffix(".weight")) for r in not_readers)]
        if missed:
            raise ProcessingError(f"quarot: MTP tensor {where}{missed[0]} reads the hidden size but the rotation "
                                  f"structure does not name it")
        out.update({where + n: t for n, t in layer.items()})
    return out
