"""The GLM-4.6V adapter: transformers' `Glm4vMoeForConditionalGeneration` (config.json model_type `glm4v_moe`; the
same modules under `glm46v`, `Glm46VForConditionalGeneration`, when its text_config is `glm4v_moe_text`): the
vision tower (`model.visual`: patch embedding, ViT blocks, a conv downsample and the patch merger) in front of a
GLM-4.5-Air-like MoE text decoder (`model.language_model`) with M-RoPE positions over partial rotary dims.

- Names: published under transformers' own names (`model.language_model.*`, `model.visual.*`, `lm_head`), as
  Qwen3-VL, so the model/vlm.py machinery applies unchanged: the vision tower is the first block, its output
  (quantized where a rule matched) is scattered into the embeddings by the model's own forward, which also
  computes the M-RoPE positions (from the processor's mm_token_type_ids and image_grid_thw). No DeepStack.
- Text decoder: glm4_moe's (model/glm.py): q/k/v with biases, the first `first_k_dense_replace` layers dense,
  then a sigmoid router `mlp.gate` (with a correction bias), one shared expert and routed experts, unfused into
  one nn.Linear per projection and expert and written per expert (formats.md A.5). Smoothing and rotation are
  glm4_moe's; partial rotary and M-RoPE act on q/k only, so the value-head rotation stays exact.
- QuaRot: the merger's `down_proj` writes the image rows of the residual stream (`outside_writers`).
- A dense GLM-4V text decoder (text_config `glm4v_text`: GLM-4.1V, GLM-4.6V-Flash; sandwich norms and a fused
  gate_up_proj) is refused before anything is read.
- A multi-token-prediction layer after the last text layer is passed through as for glm4_moe (model/passthrough);
  unlike glm4_moe's adapter, no MTP rotation is declared here, so it is not rotated.
"""
from __future__ import annotations

from dataclasses import replace

from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.model.glm import GLM4_MOE_SMOOTHING
from msmodelslim.model.interface import ModelStructure
from msmodelslim.model.kv_cache import LLAMA_KV_CACHE
from msmodelslim.model.moe import StackedSlice, stacked_source
from msmodelslim.model.rotation import decoder_rotation, gated_mlp, gqa_attention, routed_experts
from msmodelslim.model.vlm import VlmAdapter
from msmodelslim.model.vlm_structure import TRANSFORMERS_5, VlmFamily, VlmLayout

GLM4V_MOE = VlmFamily("glm4v_moe", stream_writers=("merger.down_proj",), moe=True)
HF_MODEL_TYPES = ("glm4v_moe", "glm46v")  # config.json model_types building these modules
MOE_TEXT = "glm4v_moe_text"


def glm4v_moe_structure(layout: VlmLayout = TRANSFORMERS_5) -> ModelStructure:
    rotation = decoder_rotation(attention=[gqa_attention()],
                                mlp=[gated_mlp(), routed_experts(), gated_mlp("mlp.shared_experts")],
                                embedding=f"{layout.text}.embed_tokens", final_norm=f"{layout.text}.norm")
    rotation = replace(rotation, outside_writers=tuple(f"{layout.vision}.{w}" for w in GLM4V_MOE.stream_writers))
    return ModelStructure(decoder_layers=layout.decoder_layers, hf_model_types=HF_MODEL_TYPES,
                          smooth_subgraphs=GLM4_MOE_SMOOTHING, rotation=rotation, kv_cache=LLAMA_KV_CACHE)


class Glm46VAdapter(VlmAdapter):
    """GLM-4.6V (see the module docstring)."""

    family = GLM4V_MOE
    structure = glm4v_moe_structure()

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self.structure = glm4v_moe_structure(self.layout)
        text_type = getattr(self.text_config(), "model_type", None)
        if text_type != MOE_TEXT:
            raise UnsupportedError(f"{self.model_path}: text_config model_type {text_type!r}: --model_type "
                                   f"{model_type} serves GLM-4.6V's MoE text decoder ({MOE_TEXT}); the dense GLM-4V "
                                   f"text decoder (GLM-4.1V, GLM-4.6V-Flash) is not supported yet. Nothing was read")

    def _checkpoint_layout(self) -> VlmLayout:
        names = self.stored_names()
        if not all(any(n.startswith(f"{p}.") for n in names) for p in (TRANSFORMERS_5.decoder_layers,
                                                                          TRANSFORMERS_5.vision)):
            raise InvalidModelError(f"{self.model_path}: a GLM-4.6V checkpoint has model.language_model.layers.* "
                                    f"and model.visual.*; first names: {sorted(names)[:4]}")
        return TRANSFORMERS_5

    def stacked_source(self, name: str) -> StackedSlice | None:
        return stacked_source(name)  # published per expert; transformers' stacked layout if re-saved by it
