"""Where an offline rotation of the residual stream (QuaRot) applies in a family: `RotationStructure`, data
parametric in module names, and builders that assemble it from the parts decoder blocks are made of.

Names are relative to a decoder block (except embedding, final_norm and lm_head). A `*` stands for every
index of a module list (`mlp.experts.*.gate_proj`: every routed expert). A name whose module is absent in a
block is skipped there, so one structure covers dense and sparse layers alike (DeepSeek-V3's first layers
have `mlp.gate_proj`, the others `mlp.gate` plus experts), and attention variants (`q_proj` exists only when
q_lora_rank is None).

    ROTATION = decoder_rotation(
        attention=[gqa_attention()],
        mlp=[gated_mlp(), routed_experts(), gated_mlp("mlp.shared_experts")],
    )
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

HeadLayout = Literal["gqa", "mla"]


@dataclass(frozen=True)
class HeadRotation:
    """A per-head rotation of the attention values: the value rows of `value` (H_kᵀ·W per head) and the
    matching columns of `output` (W·H per head). Exact because attention mixes tokens, not channels, and
    nothing acts on the head's channels between the value projection and `output`: a gate multiplied into
    the attention output (Qwen3-Next's gated attention) breaks it, so such families describe no head rotation.

    layout "gqa": `value` is v_proj, rows [num_kv_heads, head_dim] (AttentionShape).
    layout "mla": `value` is kv_b_proj, rows per head [qk_nope_head_dim K rows; v_head_dim V rows] (MlaShape);
    only the V rows rotate.
    """

    value: str
    output: str
    layout: HeadLayout = "gqa"


@dataclass(frozen=True)
class MtpRotation:
    """Names inside a DeepSeek-style multi-token-prediction layer (`model.layers.<num_hidden_layers>.*`), which
    transformers does not build: h' = eh_proj([enorm(embed_tokens(t)); hnorm(h)]), then a full decoder layer
    (rotated as the main blocks are), then shared_head.head(shared_head.norm(·))."""

    embedding: str = "embed_tokens"
    embedding_norm: str = "enorm"
    hidden_norm: str = "hnorm"
    projection: str = "eh_proj"  # columns [embedding half | hidden half]
    head_norm: str = "shared_head.norm"
    head: str = "shared_head.head"


@dataclass(frozen=True)
class StreamMtpRotation:
    """Names inside a DeepSeek-V4 multi-token-prediction layer (`mtp.<i>.*`), which transformers does not build:
    from the main model's hyper-connection streams h [.., n, H] before its final collapse and the next token t,
        x = h_proj(hnorm(h)) + e_proj(enorm(emb(t)))    (per stream; h_proj, e_proj: [H, H])
    then a full decoder block (rotated as the main blocks are), then its own collapse (hc_head_fn), norm and head.
    The engine feeds it exactly those pre-collapse streams, so rotating every piece like its main-model
    counterpart keeps it exact in float."""

    embedding: str = "emb.tok_emb"
    embedding_norm: str = "enorm"
    hidden_norm: str = "hnorm"
    embedding_projection: str = "e_proj"
    hidden_projection: str = "h_proj"
    head_norm: str = "norm"
    head: str = "head"
    head_stream_reader: str = "hc_head_fn"


@dataclass(frozen=True)
class RotationStructure:
    """norm_readers: each RMSNorm of a block with what reads its output (its weight is folded into them and
    their columns rotate); readers may be nn.Linear or routers with a weight [E, H] read as x·Wᵀ.
    writers: what adds into the residual stream (rows rotate). heads: the value-head rotations.
    norm_offset: the norm scales by (norm_offset + weight); 1.0 for zero-centred norms (Qwen3-Next).
    mtp: the multi-token-prediction layer's names, when checkpoints of the family carry one."""

    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    heads: tuple[HeadRotation, ...] = ()
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_offset: float = 0.0
    mtp: MtpRotation | StreamMtpRotation | None = None
    # Hyper-connections (DeepSeek-V4): the residual is n parallel streams, and these weights [out, n·H] read all
    # of them side by side through an RMSNorm without gain (n·H wide, unchanged by a rotation of every stream):
    # their columns rotate per stream, W·diag(Q, …, Q). stream_readers are parameters of a block (names relative
    # to it), head_stream_readers parameters outside the blocks (the final collapse before the last norm).
    stream_readers: tuple[str, ...] = ()
    head_stream_readers: tuple[str, ...] = ()
    # Modules of a block whose input happens to be as wide as the hidden size but is not the residual stream
    # (DeepSeek-V4's grouped wo_a reads n_heads·head_dim/o_groups attention channels, 4096 in V4-Flash), so the
    # check for forgotten readers passes over them.
    not_readers: tuple[str, ...] = ()
    # Linears outside the blocks whose outputs are added into the residual stream (full module names, `*` for any
    # index): a vision-language model's merger, whose image embeddings are scattered among the token embeddings
    # (and DeepStack mergers, added after the first layers). Their output rows rotate (Qᵀ·W, b·Q) like a writer's.
    outside_writers: tuple[str, ...] = ()

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.norm_readers for name in names)


@dataclass(frozen=True)
class BlockPart:
    """One sub-layer of a decoder block: what reads the residual stream through the norm before it, what
    writes back into it, and the value-head rotations inside it."""

    readers: tuple[str, ...]
    writers: tuple[str, ...] = ()
    heads: tuple[HeadRotation, ...] = ()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def gqa_attention(prefix: str = "self_attn", q: str = "q_proj", k: str = "k_proj", v: str = "v_proj",
                  o: str = "o_proj", rotate_heads: bool = True) -> BlockPart:
    """Multi-head / grouped-query attention: q, k, v read; o writes; v→o value heads (unless rotate_heads is
    False, e.g. for an output gate between attention and o_proj)."""
    heads = (HeadRotation(_join(prefix, v), _join(prefix, o), "gqa"),) if rotate_heads else ()
    return BlockPart(tuple(_join(prefix, n) for n in (q, k, v)), (_join(prefix, o),), heads)


def mla_attention(prefix: str = "self_attn", rotate_heads: bool = True) -> BlockPart:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash): q_a_proj (or q_proj when
    q_lora_rank is None) and kv_a_proj_with_mqa read; o_proj writes; the V rows of kv_b_proj → o_proj value
    heads. The latent norms (q_a_layernorm, kv_a_layernorm) sit off the residual stream and stay as they are."""
    readers = tuple(_join(prefix, n) for n in ("q_a_proj", "q_proj", "kv_a_proj_with_mqa"))
    heads = (HeadRotation(_join(prefix, "kv_b_proj"), _join(prefix, "o_proj"), "mla"),) if rotate_heads else ()
    return BlockPart(readers, (_join(prefix, "o_proj"),), heads)


def gated_mlp(prefix: str = "mlp", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
              extra_readers: Sequence[str] = ()) -> BlockPart:
    """down(act(gate(x))·up(x)): the dense MLP, or a shared expert under its own prefix. extra_readers are
    other modules reading the same input, relative to the prefix (Qwen3-Next's `shared_expert_gate`)."""
    readers = tuple(_join(prefix, n) for n in (gate, up, *extra_readers))
    return BlockPart(readers, (_join(prefix, down),))


def routed_experts(prefix: str = "mlp", router: str = "gate", experts: str = "experts", gate: str = "gate_proj",
                   up: str = "up_proj", down: str = "down_proj") -> BlockPart:
    """The router (weight [E, H]) and every routed expert's gate/up read; every expert's down writes. Routing
    is unchanged: the router's logits are the same numbers in the rotated basis (a correction bias added
    after the matmul, as DeepSeek-V3's e_score_correction_bias, needs nothing)."""
    each = _join(prefix, f"{experts}.*")
    return BlockPart((_join(prefix, router), f"{each}.{gate}", f"{each}.{up}"), (f"{each}.{down}",))


def decoder_rotation(attention: Sequence[BlockPart], mlp: Sequence[BlockPart], input_norm: str = "input_layernorm",
                     post_attention_norm: str = "post_attention_layernorm", embedding: str = "model.embed_tokens",
                     final_norm: str = "model.norm", lm_head: str = "lm_head", norm_offset: float = 0.0,
                     mtp: MtpRotation | None = None) -> RotationStructure:
    """A pre-norm decoder block: the attention parts read `input_norm`, the MLP parts `post_attention_norm`.
    Several parts per side cover layers that differ (dense and MoE MLPs, full and linear attention)."""
    parts = [*attention, *mlp]
    return RotationStructure(
        norm_readers=((input_norm, tuple(n for p in attention for n in p.readers)),
                      (post_attention_norm, tuple(n for p in mlp for n in p.readers))),
        writers=tuple(n for p in parts for n in p.writers),
        heads=tuple(h for p in parts for h in p.heads),
        embedding=embedding, final_norm=final_norm, lm_head=lm_head, norm_offset=norm_offset, mtp=mtp,
    )


LLAMA_ROTATION = decoder_rotation(attention=[gqa_attention()], mlp=[gated_mlp()])
# Qwen3-MoE: every layer sparse by default; mlp_only_layers / decoder_sparse_step may leave some dense
QWEN3_MOE_ROTATION = decoder_rotation(attention=[gqa_attention()], mlp=[gated_mlp(), routed_experts()])
DEEPSEEK_V3_ROTATION = decoder_rotation(
    attention=[mla_attention()],
    mlp=[gated_mlp(), routed_experts(), gated_mlp("mlp.shared_experts")],
    mtp=MtpRotation(),
)
