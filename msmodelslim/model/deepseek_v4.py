"""DeepSeek-V4-Flash / DeepSeek-V4-Pro (config.json model_type `deepseek_v4`), on transformers' DeepseekV4 model.

Names. The published checkpoints keep DeepSeek's native tensor names, and the output keeps them too: vLLM-Ascend
reads them and aliases them to its modules itself (formats.md A.2: `attn`→`self_attn`, `ffn`→`mlp`,
`w1/w2/w3`→`gate/down/up_proj`, `embed`→`embed_tokens`, `head`→`lm_head`, when `hc_head_fn` exists). transformers
builds other names (`model.layers.N.self_attn.q_a_proj`, fused experts, the indexer inside the compressor,
hyper-connection weights inside `attn_hc`), so `prepare_skeleton` moves every module, parameter and buffer to its
native place (`NATIVE_LAYER`, skeleton_edits.relocate) before anything is read; transformers' forward code runs
unchanged. The plan, recipe patterns, the loader and the writer then all see the native names:

    embed, layers.N.{attn_norm, ffn_norm, hc_attn_{fn,base,scale}, hc_ffn_{fn,base,scale}},
    layers.N.attn.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink},
    layers.N.attn.compressor.{wkv, wgate, ape, norm}                          (compressed layers),
    layers.N.attn.indexer.{wq_b, weights_proj, compressor.{wkv, wgate, ape, norm}}  (CSA layers),
    layers.N.ffn.{gate.weight, gate.bias | gate.tid2eid, experts.E.{w1,w3,w2}, shared_experts.{w1,w3,w2}},
    norm, head, hc_head_{fn,base,scale}.

What the engine runs in float (never planned): the compressors' and the indexer's projections (DeepSeek ships them in
bf16 next to FP8 attention weights; transformers keeps them out of FP8 too), the indexer's weights_proj, and wo_a,
the grouped output projection (a block-diagonal batched matmul; the Ascend DeepSeek-V4 attention code we read builds
it with a quantization method only in an MXFP8 mode). Routers are not linears. vLLM fuses wq_a with wkv (fused_wqa_wkv) and each expert's w1 with w3.

Smoothing (exact in float): attn_norm → {wq_a, wkv, the compressor's and the indexer's readers}, one scale; q_norm →
{wq_b, the indexer's wq_b} (both read the query latent; the compressor's and indexer's readers are optional
targets, `?`, present in compressed / CSA layers only); ffn_norm → {router, every expert's w1/w3, the shared
expert's w1/w3}, one scale, so routing is unchanged; wo_a → wo_b (linear-linear; wo_a's output rows in wo_b's
column order). Not described: w3 → w2 (up is clamped to ±swiglu_limit before the product, and a clamp does not
commute with a scale), and value smoothing (the single KV head is key and value at once, with RoPE on its tail).

Rotation (QuaRot, exact in float): the residual is hc_mult parallel streams (manifold-constrained hyper-connections).
Every stream rotates by Q: the embedding E·Q; the norms' readers W·Q after folding their gains; the writers wo_b and
every w2 as Qᵀ·W; and the hyper-connection weights hc_attn_fn, hc_ffn_fn and hc_head_fn, which read all streams side
by side through an RMSNorm without gain, per stream (W·diag(Q, …, Q)). The collapse and expansion of the streams are
per-token linear mixes of whole streams, which commute with Q. No value-head rotation (key = value, RoPE). The final
norm folds into head.

The multi-token-prediction layers (`mtp.<i>.*`: enorm/e_proj, hnorm/h_proj, a decoder block, its own hc_head_*, norm
and head) are not built: written through unchanged (model/passthrough.py), or, under quarot, rotated from their
tensors like the main model (StreamMtpRotation; exact, the engine feeds them the pre-collapse streams).

DeepSeek's release format (FP8 e4m3 weights with `.scale` block scales, FP4 routed experts) is dequantized on load
(model/deepseek_v4_checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model.deepseek_v4_checkpoint import DeepseekV4ReleaseCheckpoint, release_scaled_weights
from msmodelslim.model.interface import ModelStructure, SmoothSubgraph
from msmodelslim.model.moe import W1_W3_W2, UnfusedExperts, is_fused_experts
from msmodelslim.model.rotation import RotationStructure, StreamMtpRotation
from msmodelslim.model.skeleton_edits import keep_float, relocate
from msmodelslim.model.transformers_model import TransformersModel


class GroupedOutputProjection(nn.Module):
    """wo_a: `o_groups` independent projections, group g maps its slice of the attention output [.., G, D] to its
    o_lora_rank outputs (the block-diagonal matmul of transformers' DeepseekV4GroupedLinear), with the groups'
    outputs concatenated [.., G·R] in the order wo_b reads them. Not an nn.Linear: the engine runs it in float, and
    no linear algorithm could treat it as one matmul. Smoothing reaches it as the source of wo_a → wo_b."""

    def __init__(self, weight: torch.Tensor, n_groups: int) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, width = x.shape[:-2], x.shape[-1]
        w = self.weight.view(self.n_groups, -1, width)  # [G, R, D]
        y = torch.einsum("...gd,grd->...gr", x, w.to(x.dtype))
        return y.reshape(*leading, -1)

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, weight={list(self.weight.shape)}"


@dataclass(frozen=True)
class Move:
    """One edit of a decoder layer: `old` (a dotted path in the current tree) goes to `new`."""

    old: str
    new: str


# transformers' DeepseekV4DecoderLayer -> DeepSeek's native names, in order (paths as the tree is at that step).
NATIVE_LAYER = (
    Move("attn_hc.fn", "hc_attn_fn"), Move("attn_hc.base", "hc_attn_base"), Move("attn_hc.scale", "hc_attn_scale"),
    Move("ffn_hc.fn", "hc_ffn_fn"), Move("ffn_hc.base", "hc_ffn_base"), Move("ffn_hc.scale", "hc_ffn_scale"),
    Move("input_layernorm", "attn_norm"), Move("post_attention_layernorm", "ffn_norm"),
    Move("self_attn.sinks", "self_attn.attn_sink"), Move("self_attn.q_a_proj", "self_attn.wq_a"),
    Move("self_attn.q_a_norm", "self_attn.q_norm"), Move("self_attn.q_b_proj", "self_attn.wq_b"),
    Move("self_attn.kv_proj", "self_attn.wkv"), Move("self_attn.o_a_proj", "self_attn.wo_a"),
    Move("self_attn.o_b_proj", "self_attn.wo_b"),
    Move("self_attn.compressor.kv_proj", "self_attn.compressor.wkv"),
    Move("self_attn.compressor.gate_proj", "self_attn.compressor.wgate"),
    Move("self_attn.compressor.kv_norm", "self_attn.compressor.norm"),
    Move("self_attn.compressor.position_bias", "self_attn.compressor.ape"),
    # the CSA indexer sits beside the compressor on disk, its own compressor's weights one level down
    Move("self_attn.compressor.indexer", "self_attn.indexer"),
    Move("self_attn.indexer.kv_proj", "self_attn.indexer.compressor.wkv"),
    Move("self_attn.indexer.gate_proj", "self_attn.indexer.compressor.wgate"),
    Move("self_attn.indexer.kv_norm", "self_attn.indexer.compressor.norm"),
    Move("self_attn.indexer.position_bias", "self_attn.indexer.compressor.ape"),
    Move("self_attn.indexer.q_b_proj", "self_attn.indexer.wq_b"),
    Move("self_attn.indexer.scorer.weights_proj", "self_attn.indexer.weights_proj"),
    Move("mlp.gate.e_score_correction_bias", "mlp.gate.bias"),
    Move("mlp.shared_experts.gate_proj", "mlp.shared_experts.w1"),
    Move("mlp.shared_experts.up_proj", "mlp.shared_experts.w3"),
    Move("mlp.shared_experts.down_proj", "mlp.shared_experts.w2"),
    Move("self_attn", "attn"), Move("mlp", "ffn"),
)
# transformers' DeepseekV4ForCausalLM -> the checkpoint's top level (no `model.` prefix)
NATIVE_ROOT = (Move("lm_head", "head"), Move("model.embed_tokens", "embed"), Move("model.layers", "layers"),
               Move("model.norm", "norm"), Move("model.hc_head.hc_fn", "hc_head_fn"),
               Move("model.hc_head.hc_base", "hc_head_base"), Move("model.hc_head.hc_scale", "hc_head_scale"))

# Built by the engine without a quantization method (see the module docstring); wo_a is GroupedOutputProjection.
ENGINE_FLOAT = ("attn.compressor.wkv", "attn.compressor.wgate", "attn.indexer.compressor.wkv",
                "attn.indexer.compressor.wgate", "attn.indexer.weights_proj")  # relative to a decoder layer

# Every layer's input norm feeds wq_a and wkv; compressed layers add their compressor, CSA layers their indexer.
_COMPRESSOR_READERS = ("attn.compressor.wkv", "attn.compressor.wgate", "attn.indexer.compressor.wkv",
                       "attn.indexer.compressor.wgate", "attn.indexer.weights_proj")
_ATTENTION_READERS = ("attn.wq_a", "attn.wkv") + _COMPRESSOR_READERS
_FFN_READERS = ("ffn.gate", "ffn.experts.*.w1", "ffn.experts.*.w3", "ffn.shared_experts.w1", "ffn.shared_experts.w3")
DEEPSEEK_V4_SMOOTHING = (
    SmoothSubgraph("norm-linear", "attn_norm", ("attn.wq_a", "attn.wkv") + tuple(f"{n}?" for n in _COMPRESSOR_READERS)),
    SmoothSubgraph("norm-linear", "attn.q_norm", ("attn.wq_b", "attn.indexer.wq_b?")),
    SmoothSubgraph("linear-linear", "attn.wo_a", ("attn.wo_b",)),
    SmoothSubgraph("norm-linear", "ffn_norm", _FFN_READERS),
)
DEEPSEEK_V4_ROTATION = RotationStructure(
    norm_readers=(("attn_norm", _ATTENTION_READERS), ("ffn_norm", _FFN_READERS)),
    writers=("attn.wo_b", "ffn.experts.*.w2", "ffn.shared_experts.w2"),
    embedding="embed", final_norm="norm", lm_head="head",
    stream_readers=("hc_attn_fn", "hc_ffn_fn"), head_stream_readers=("hc_head_fn",),
    not_readers=("attn.wo_a",), mtp=StreamMtpRotation(),
)


def _parent(root: nn.Module, path: str, create: bool) -> tuple[nn.Module, str] | None:
    """(the module holding the last part of `path`, that part); missing intermediate modules are created empty
    when `create` (the indexer's `compressor`), else None."""
    module = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = getattr(module, part, None)
        if child is None:
            if not create:
                return None
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module, leaf


def apply_moves(root: nn.Module, moves: tuple[Move, ...]) -> None:
    """Each move whose source exists in `root` (layers differ: no compressor, no indexer, hash or scored router)."""
    for move in moves:
        found = _parent(root, move.old, create=False)
        if found is None:
            continue
        holder, name = found
        if name not in holder._modules and name not in holder._parameters and name not in holder._buffers:
            continue
        if holder._modules.get(name, 0) is None:  # e.g. `compressor = None` in a sliding layer
            continue
        owner, owner_name = _parent(root, move.new, create=True)
        relocate(holder, name, owner, owner_name)


def native_layer(layer: nn.Module) -> None:
    """Reshape one transformers DeepseekV4DecoderLayer into DeepSeek's native module tree, in place (the main
    blocks, and the decoder block of a multi-token-prediction layer)."""
    attn = layer.self_attn
    grouped = attn.o_a_proj
    attn.o_a_proj = GroupedOutputProjection(grouped.weight, grouped.n_groups)
    experts = layer.mlp.experts
    if not is_fused_experts(experts):
        raise UnsupportedError(f"{type(experts).__name__}: DeepSeek-V4 experts are expected fused "
                               f"(gate_up_proj, down_proj) in transformers' DeepseekV4 model")
    # the clamped SwiGLU of transformers' _apply_gate: gate clamped before SiLU, up to ±limit
    layer.mlp.experts = UnfusedExperts.from_fused(experts, names=W1_W3_W2, limit=experts.limit,
                                                  clamp_before_activation=True)
    apply_moves(layer, NATIVE_LAYER)
    keep_float(layer, ENGINE_FLOAT)
    layer.eval()  # the modules made here start in training mode


def native_skeleton(model: nn.Module) -> None:
    """Reshape transformers' DeepseekV4ForCausalLM into DeepSeek's native module tree, in place."""
    apply_moves(model, NATIVE_ROOT)
    for layer in model.layers:
        native_layer(layer)


class DeepseekV4Adapter(TransformersModel):
    """DeepSeek-V4-Flash / DeepSeek-V4-Pro: see the module docstring."""

    structure = ModelStructure(decoder_layers="layers", hf_model_types=("deepseek_v4",),
                               fused_groups=(("wq_a", "wkv"), ("w1", "w3")), row_parallel=("wo_b", "w2"),
                               smooth_subgraphs=DEEPSEEK_V4_SMOOTHING, rotation=DEEPSEEK_V4_ROTATION)
    attn_implementation = "eager"  # transformers' DeepseekV4 has no sdpa path (attention sinks, compressed keys)

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        if release_scaled_weights(set(self.stored_names())):  # DeepSeek's FP8 / FP4 weights: dequantized on load
            self.checkpoint = DeepseekV4ReleaseCheckpoint(self.model_path, self._fp8_block)

    def attention_shape(self):
        return None  # one shared key/value head with RoPE on its tail: no per-head value rotation or smoothing

    def mla_shape(self):
        return None

    def prepare_skeleton(self, model: nn.Module) -> None:
        native_skeleton(model)
