"""Adapters of the Llama, Qwen and DeepSeek families: each is its structure, described once as data."""
from torch import nn

from msmodelslim.model.interface import LLAMA_ROTATION, LLAMA_SMOOTH_SUBGRAPHS, AttentionShape, ModelStructure
from msmodelslim.model.moe import unfuse_experts
from msmodelslim.model.transformers_model import TransformersModel


class LlamaAdapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("llama",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)


class Qwen2Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen2",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)


class Qwen3Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen3",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)


class MoeAdapter(TransformersModel):
    """Base of the mixture-of-experts families: the fused experts transformers builds are split into one
    nn.Linear per projection and expert before loading (model/moe.py), so every linear algorithm applies to
    experts and the names match the checkpoint and the ascendv1 format. Smoothing subgraphs and rotations
    are not described yet, so those processors refuse to run on these adapters."""

    def prepare_skeleton(self, model: nn.Module) -> None:
        unfuse_experts(model)


class Qwen3MoeAdapter(MoeAdapter):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B): GQA attention, routed experts only."""

    structure = ModelStructure(hf_model_types=("qwen3_moe",))


class DeepseekV3Adapter(MoeAdapter):
    """DeepSeek-V3/R1: MLA attention (q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa ->
    kv_a_layernorm -> kv_b_proj; o_proj), the first `first_k_dense_replace` layers dense, then shared plus
    routed experts. vLLM fuses q_a_proj with kv_a_proj_with_mqa (fused_qkv_a_proj), so they share a scheme."""

    structure = ModelStructure(hf_model_types=("deepseek_v3",),
                               fused_groups=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")))

    def attention_shape(self) -> AttentionShape | None:
        return None  # MLA has no per-head v_proj/o_proj pair for 'ov' smoothing or head rotations
