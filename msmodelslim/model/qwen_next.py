"""Qwen3-Next (qwen3_next, Qwen3-Next-80B-A3B-Instruct): a hybrid of linear-attention layers (Gated DeltaNet,
`linear_attn`) and full-attention layers (`self_attn`, every `full_attention_interval`-th layer), each followed by
a sparse MoE (softmax router, routed experts, one shared expert scaled by a sigmoid `shared_expert_gate`).

What can be quantized, as vLLM-Ascend loads it:
- full attention: q_proj (query and output gate rows), k_proj, v_proj (fused into qkv_proj by the engine, so they
  share one scheme) and o_proj;
- linear attention: in_proj_qkvz (query/key/value/z projections) and out_proj are linears the engine builds with
  the quantization config; the established tool's practice quantizes in_proj_qkvz and leaves out_proj float;
- the routed experts and the shared expert's gate/up/down.

What stays float, always:
- `linear_attn.in_proj_ba` (the per-head beta/alpha gates) and `mlp.shared_expert_gate`: the engine builds them
  without quantization (quant_config=None), so they are not linears any rule can plan (skeleton_edits.keep_float);
- `linear_attn.conv1d` (a depthwise convolution), `A_log`, `dt_bias` and the gated norm: parameters, not linears;
- the router (`mlp.gate`) and every norm.

The checkpoint's multi-token-prediction module (`mtp.*`) is not part of the model transformers builds
(model/passthrough.py decides what becomes of it). Calibration runs each block on the arguments the model
passes it (linear- and full-attention layers get different masks: model/block_arguments.py).

Smoothing and rotation. Every norm of the residual stream scales by (1 + weight) (`norm_offset=1.0`).
- The input norm feeds q_proj/k_proj/v_proj in a full-attention layer and in_proj_qkvz/in_proj_ba in a
  linear-attention one (each layer has one kind: the other subgraph is skipped there); the post-attention norm
  feeds the router, every expert's gate/up, the shared expert's gate/up and `shared_expert_gate` (one scale).
  These readers are linears of the normed input, so smoothing (their columns times s) and rotation (their columns
  times Q) leave their outputs, and whatever follows (the conv1d and delta rule of the linear attention, the
  per-head q/k norms, the sigmoid gates), unchanged: exact.
- v_proj -> o_proj smoothing is exact in spite of the output gate: attention output channel c is multiplied by
  sigmoid(gate_c), which commutes with a per-channel scale. A per-head ROTATION does not commute with it, so the
  full attention has no value-head rotation (`rotate_heads=False`).
- The linear attention's value path (in_proj_qkvz's v rows -> conv1d -> delta rule -> gated norm -> out_proj) is
  not smoothed: a per-channel scale does not pass through the gated RMSNorm over each value head.
"""
from __future__ import annotations

from torch import nn

from msmodelslim.model.block_arguments import EveryBlockArguments
from msmodelslim.model.families import MoeAdapter
from msmodelslim.model.interface import (ModelStructure, dense_mlp_subgraphs, gqa_attention_subgraphs,
                                         moe_mlp_subgraphs)
from msmodelslim.model.rotation import BlockPart, decoder_rotation, gated_mlp, gqa_attention, routed_experts
from msmodelslim.model.skeleton_edits import keep_float

ENGINE_FLOAT = ("*.linear_attn.in_proj_ba", "*.mlp.shared_expert_gate")
LINEAR_ATTENTION_READERS = ("in_proj_qkvz", "in_proj_ba")
SHARED_EXPERT_GATE = "shared_expert_gate"  # reads the post-attention norm's output, next to the shared expert

# mlp_only_layers may make some layers dense (`mlp.gate_proj`): both MLP kinds are described.
QWEN3_NEXT_SMOOTHING = (gqa_attention_subgraphs()
                        + gqa_attention_subgraphs(attn="linear_attn", readers=LINEAR_ATTENTION_READERS, value=None)
                        + dense_mlp_subgraphs()
                        + moe_mlp_subgraphs(shared="shared_expert", extra_readers=(SHARED_EXPERT_GATE,)))
QWEN3_NEXT_ROTATION = decoder_rotation(
    attention=[gqa_attention(rotate_heads=False),  # the sigmoid output gate acts on the heads' channels
               BlockPart(tuple(f"linear_attn.{n}" for n in LINEAR_ATTENTION_READERS), ("linear_attn.out_proj",))],
    mlp=[gated_mlp(), routed_experts(), gated_mlp("mlp.shared_expert"), BlockPart((f"mlp.{SHARED_EXPERT_GATE}",))],
    norm_offset=1.0,
)


class Qwen3NextAdapter(EveryBlockArguments, MoeAdapter):
    structure = ModelStructure(hf_model_types=("qwen3_next",),
                               row_parallel=("o_proj", "down_proj", "out_proj"), smooth_subgraphs=QWEN3_NEXT_SMOOTHING,
                               norm_offset=1.0, rotation=QWEN3_NEXT_ROTATION)

    def prepare_skeleton(self, model: nn.Module) -> None:
        super().prepare_skeleton(model)
        keep_float(model, ENGINE_FLOAT)
