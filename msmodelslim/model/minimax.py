"""MiniMax-M2 / MiniMax-M2.7 (minimax_m2): grouped-query attention with per-layer q/k norms over all heads and
partial rotary embedding, and in every layer a sparse MoE block of routed experts only (sigmoid router with a
correction bias, no shared expert).

On disk, in vLLM and in the ascendv1 output the MoE block is `block_sparse_moe` and an expert's projections are
`w1` (gate), `w3` (up) and `w2` (down): `model.layers.L.block_sparse_moe.experts.E.w1.weight`, router
`block_sparse_moe.gate.weight`, correction bias `block_sparse_moe.e_score_correction_bias`. transformers calls
the block `mlp` and fuses the experts; the adapter renames the block back and splits the experts under the
w1/w3/w2 names, so recipes match the upstream ones (`*block_sparse_moe.experts*`) and a checkpoint stacked
in transformers' layout (`experts.gate_up_proj`, `experts.down_proj`) loads too. vLLM-Ascend reads only
expert 0's `w1`/`w2`/`w3` entries for a layer's MoE type (formats.md A.3).

Smoothing and rotation: the q/k norms span all heads jointly, but they act on q_proj's and k_proj's outputs,
which neither the norm -> q/k/v smoothing nor the residual rotation (q/k columns) changes; nothing acts on the
value heads between v_proj and o_proj, so the v -> o smoothing and the value-head rotation are exact too. The
router reads the norm output as x·Wᵀ and takes the same column scale / rotation; the correction bias is added
after the sigmoid and needs nothing.

KV cache: the attention writes K (after k_norm and the partial RoPE) and V into its cache as Llama's does, so C8
(dynamic_cache) taps `self_attn`. The fold points before RoPE are q_norm / k_norm, but they span all heads
(one weight per channel of every head) and the RoPE is partial, so kv_smooth (which folds one scale per head
channel pair into a per-head norm or a projection) refuses them by name.
"""
from __future__ import annotations

from torch import nn

from msmodelslim.model.families import MoeAdapter
from msmodelslim.model.interface import ModelStructure, gqa_attention_subgraphs, moe_mlp_subgraphs
from msmodelslim.model.kv_cache import KvCacheStructure
from msmodelslim.model.moe import W1_W3_W2, unfuse_experts
from msmodelslim.model.rotation import decoder_rotation, gqa_attention, routed_experts
from msmodelslim.model.skeleton_edits import rename_child

MOE_BLOCK = "block_sparse_moe"  # the checkpoint's name of transformers' `mlp`
EXPERT_NAMES = dict(gate=W1_W3_W2.gate, up=W1_W3_W2.up, down=W1_W3_W2.down)
MINIMAX_M2_SMOOTHING = gqa_attention_subgraphs() + moe_mlp_subgraphs(mlp=MOE_BLOCK, **EXPERT_NAMES)
MINIMAX_M2_ROTATION = decoder_rotation(attention=[gqa_attention()], mlp=[routed_experts(MOE_BLOCK, **EXPERT_NAMES)])
MINIMAX_M2_KV_CACHE = KvCacheStructure(query_fold="q_norm", key_fold="k_norm")  # norms over all heads


class MiniMaxM2Adapter(MoeAdapter):
    structure = ModelStructure(hf_model_types=("minimax_m2",), fused_groups=(("q_proj", "k_proj", "v_proj"),),
                               row_parallel=("o_proj", W1_W3_W2.down), smooth_subgraphs=MINIMAX_M2_SMOOTHING,
                               rotation=MINIMAX_M2_ROTATION, kv_cache=MINIMAX_M2_KV_CACHE)

    def prepare_skeleton(self, model: nn.Module) -> None:
        for layer in model.get_submodule(self.structure.decoder_layers):
            rename_child(layer, "mlp", MOE_BLOCK)
        unfuse_experts(model, W1_W3_W2)
