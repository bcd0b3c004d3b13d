"""Zhipu GLM families: GLM-4.5 / GLM-4.6 / GLM-4.7 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite) and GLM-5 / GLM-5.1
(glm_moe_dsa).

- glm4_moe: grouped-query attention (q/k/v with biases, optional q/k norms, partial rotary), the first
  `first_k_dense_replace` layers dense, then a sigmoid router with a correction bias, one shared expert and
  routed experts. vLLM fuses q/k/v (qkv_proj) and gate/up (dense MLP and shared expert).
- glm4_moe_lite and glm_moe_dsa: DeepSeek-V3's multi-head latent attention under the same module names
  (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj) and DeepSeek-V3's
  MoE, so they are DeepSeek-V3 adapters (its smoothing and rotation structures apply); glm_moe_dsa adds
  DeepSeek-V3.2's sparse-attention indexer (model/deepseek.py SparseIndexerMixin).

Their checkpoints carry a multi-token-prediction layer after the last decoder layer (`model.layers.<N>`), which
transformers does not build (model/passthrough.py decides what becomes of it).

glm4_moe's smoothing and rotation are Qwen3-MoE's plus the shared expert and the dense first layers (DeepSeek-V3's
MLP side): the per-head q/k norms act on q_proj/k_proj outputs, which neither smoothing (the norm's scale goes
into q/k/v columns) nor the residual rotation (q/k columns) changes, and the partial rotary embedding acts on
q/k only, so nothing between v_proj and o_proj touches a value head's channels: the v -> o smoothing and the
value-head rotation are exact (v_proj's bias takes the same row scale / rotation). The MTP layer uses DeepSeek-V3's
names (enorm, hnorm, eh_proj, shared_head), so quarot rotates it as DeepSeek-V3's.
"""
from __future__ import annotations

from dataclasses import replace

from msmodelslim.model.deepseek import SparseIndexerMixin, with_indexer_readers
from msmodelslim.model.families import DeepseekV3Adapter, MoeAdapter
from msmodelslim.model.interface import (ModelStructure, dense_mlp_subgraphs, gqa_attention_subgraphs,
                                         moe_mlp_subgraphs)
from msmodelslim.model.rotation import MtpRotation, decoder_rotation, gated_mlp, gqa_attention, routed_experts

# first_k_dense_replace dense layers (`mlp.gate_proj`), then router `mlp.gate` + `mlp.experts.<e>` + `mlp.shared_experts`
GLM4_MOE_SMOOTHING = gqa_attention_subgraphs() + dense_mlp_subgraphs() + moe_mlp_subgraphs(shared="shared_experts")
GLM4_MOE_ROTATION = decoder_rotation(attention=[gqa_attention()],
                                     mlp=[gated_mlp(), routed_experts(), gated_mlp("mlp.shared_experts")],
                                     mtp=MtpRotation())


class Glm4MoeAdapter(MoeAdapter):
    """GLM-4.5, GLM-4.6, GLM-4.7 (glm4_moe): GQA attention and a DeepSeek-style MoE (shared + routed experts)."""

    structure = ModelStructure(hf_model_types=("glm4_moe",), smooth_subgraphs=GLM4_MOE_SMOOTHING,
                               rotation=GLM4_MOE_ROTATION)


class Glm4MoeLiteAdapter(DeepseekV3Adapter):
    """GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's MLA + MoE structure under a GLM config."""

    structure = replace(DeepseekV3Adapter.structure, hf_model_types=("glm4_moe_lite",))


class GlmMoeDsaAdapter(SparseIndexerMixin, DeepseekV3Adapter):
    """GLM-5, GLM-5.1 (glm_moe_dsa): GLM-4.7-Flash's MLA + MoE with DeepSeek-V3.2's sparse-attention indexer."""

    structure = with_indexer_readers(replace(DeepseekV3Adapter.structure, hf_model_types=("glm_moe_dsa",)))

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self._check_indexer()
