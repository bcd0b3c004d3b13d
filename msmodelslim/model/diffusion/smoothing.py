"""Where smoothing (iter_smooth, smooth_quant) may move a per-channel scale in a DiT block, as data on the family
(the adapter side of IterSmoothInterface for diffusion transformers; protocol.md §5.1 rows wan2_2*).

A `DitSmoothSubgraph` names the linears that read one activation (`targets`, relative to a block) and, when one
exists, the `source` that produces it and can absorb X / s exactly:

    source = a norm with a gain (and bias)      "norm-linear": gain and bias divided by s
    source = the value projection of attention  "ov": to_v's rows divided, to_out.0's columns multiplied, per head
                                                 (the value heads are what attention mixes, channel by channel)
    source = None                                non-fusion (ir/non_fusion_smooth.py): the targets are wrapped and
                                                 their input divided by s at run time, `<p>.div.mul_scale`

A DiT has no fusible source in front of most of its linears: adaLN's norm(x)·(1 + scale) + shift takes its scale
and shift from the timestep embedding shared by every block, and ffn.net.2 reads GELU's output. Those are
described with source None. A source the block has without a gain (diffusers' nn.Identity for norm2 when
cross_attn_norm is false) makes that subgraph non-fusion in that block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DitSmoothSubgraph:
    kind: str  # "norm-linear", "ov" or "up-down" (the kinds enable_subgraph_type names)
    targets: tuple[str, ...]
    source: Optional[str] = None  # None: non-fusion
    attention: Optional[str] = None  # "ov": the attention module whose heads group the channels


@dataclass(frozen=True)
class DitSmoothing:
    """A family's smoothing subgraphs of one block, smoothed in the processor's kind order."""

    subgraphs: tuple[DitSmoothSubgraph, ...]

    @property
    def kinds(self) -> set[str]:
        return {g.kind for g in self.subgraphs}


# WanTransformerBlock (diffusers): norm1 (adaLN, no gain) -> attn1 q/k/v; norm2 (LayerNorm with gain and bias when
# cross_attn_norm) -> attn2.to_q; the text states (shared by every block) -> attn2 to_k/to_v; norm3 (adaLN) ->
# ffn.net.0.proj; GELU -> ffn.net.2. Both attentions are multi-head (as many value heads as query heads) and apply
# their q/k norms to Q and K only, so to_v -> to_out.0 folds exactly.
WAN_SMOOTHING = DitSmoothing((
    DitSmoothSubgraph("norm-linear", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    DitSmoothSubgraph("ov", ("attn1.to_out.0",), source="attn1.to_v", attention="attn1"),
    DitSmoothSubgraph("norm-linear", ("attn2.to_q",), source="norm2"),
    DitSmoothSubgraph("norm-linear", ("attn2.to_k", "attn2.to_v")),
    DitSmoothSubgraph("ov", ("attn2.to_out.0",), source="attn2.to_v", attention="attn2"),
    DitSmoothSubgraph("norm-linear", ("ffn.net.0.proj",)),
    DitSmoothSubgraph("up-down", ("ffn.net.2",)),
))
