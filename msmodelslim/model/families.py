"""Adapters of the Llama, Qwen and DeepSeek families: each is its structure, described once as data."""
from torch import nn

from msmodelslim.model.interface import (
    LLAMA_ROTATION,
    LLAMA_SMOOTH_SUBGRAPHS,
    AttentionShape,
    ModelStructure,
    dense_mlp_subgraphs,
    gqa_attention_subgraphs,
    mla_attention_subgraphs,
    moe_mlp_subgraphs,
)
from msmodelslim.model.kv_cache import LLAMA_KV_CACHE, QWEN3_KV_CACHE
from msmodelslim.model.moe import unfuse_experts
from msmodelslim.model.rotation import DEEPSEEK_V3_ROTATION, QWEN3_MOE_ROTATION
from msmodelslim.model.transformers_model import TransformersModel


class LlamaAdapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("llama",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION, kv_cache=LLAMA_KV_CACHE)


class Qwen2Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen2",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION, kv_cache=LLAMA_KV_CACHE)


class Qwen3Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen3",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION, kv_cache=QWEN3_KV_CACHE)


class MoeAdapter(TransformersModel):
    """Base of the mixture-of-experts families: the fused experts transformers builds are split into one
    nn.Linear per projection and expert before loading (model/moe.py), so every linear algorithm applies to
    experts and the names match the checkpoint and the ascendv1 format."""

    def prepare_skeleton(self, model: nn.Module) -> None:
        unfuse_experts(model)


class Qwen3MoeAdapter(MoeAdapter):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B): GQA attention, routed experts only."""

    # mlp_only_layers / decoder_sparse_step can make some layers dense: both MLP kinds are described.
    structure = ModelStructure(hf_model_types=("qwen3_moe",), rotation=QWEN3_MOE_ROTATION, kv_cache=QWEN3_KV_CACHE,
                               smooth_subgraphs=gqa_attention_subgraphs() + dense_mlp_subgraphs() + moe_mlp_subgraphs())


class DeepseekV3Adapter(MoeAdapter):
    """DeepSeek-V3/R1: MLA attention (q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa ->
    kv_a_layernorm -> kv_b_proj; o_proj), the first `first_k_dense_replace` layers dense, then shared plus
    routed experts. vLLM fuses q_a_proj with kv_a_proj_with_mqa (fused_qkv_a_proj), so they share a scheme."""

    structure = ModelStructure(hf_model_types=("deepseek_v3",),
                               fused_groups=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),
                               rotation=DEEPSEEK_V3_ROTATION,
                               smooth_subgraphs=mla_attention_subgraphs() + dense_mlp_subgraphs()
                               + moe_mlp_subgraphs(shared="shared_experts"))

    def attention_shape(self) -> AttentionShape | None:
        return None  # MLA has no v_proj; its value heads (V rows of kv_b_proj) are described by mla_shape()
