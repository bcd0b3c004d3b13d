"""Step-3.5-Flash (config.json model_type `step3p5`; its own code names the class Step3p5ForCausalLM).

transformers has no causal-LM class for `step3p5`, but it has the architecture: the text model of Step-3.7
(`Step3p7TextModel`, configured by `Step3p7TextConfig`, whose model_type IS `step3p5` and which reads Step-3.5's
config.json keys: moe_layers_enum, attention_other_setting, num_attention_groups, moe_num_experts/moe_top_k,
share_expert_dim, swiglu_limits(_shared), per-layer rope_theta and partial_rotary_factors, trailing MTP entries).
Its modules match what vLLM's step3p5 model computes: GQA with zero-centred q/k norms and a per-head sigmoid
output gate (g_proj), sliding-window layers with their own head count, dense first layers, then a MoE of a
sigmoid router with a correction bias, routed experts with clamped SwiGLU (swiglu_limits) and a shared expert.
`Step3p5ForCausalLM` here is that text model plus the lm_head, nothing else; no checkpoint code runs.

Checked before any weight is read (what transformers' text model cannot express is refused by name):
`att_impl_type` must be GQA; sliding layers (attention_other_setting) may change the head count only, not the
key/value groups or head size; `use_rope_layers`, if present, must enable RoPE everywhere.

Names (on disk, in vLLM and in the output): a sparse layer's MoE is `moe` (transformers: `mlp`), its router
`moe.gate`, the router's correction bias `moe.router_bias` (transformers: `mlp.gate.e_score_correction_bias`),
the shared expert `moe.share_expert` (transformers: `mlp.shared_experts`). The published checkpoint stacks the
routed experts per projection (`moe.gate_proj.weight`, `moe.up_proj.weight` [E, I, H], `moe.down_proj.weight`
[E, H, I]); they load into per-expert linears written as `moe.experts.E.{gate,up,down}_proj`, the per-expert
layout vLLM's step3p5 loader and vLLM-Ascend (expert 0's entries decide the MoE type) read. Dense layers keep `mlp`.
Calibration runs each block on the arguments the model passes it (sliding and full layers differ: model/
block_arguments.py).

Smoothing and rotation (norms scale by 1 + weight: norm_offset 1.0). The input norm feeds q/k/v and the head-wise
gate g_proj, the post-attention norm the dense MLP's gate/up, or the router `moe.gate`, every expert's gate/up and
the shared expert's gate/up: smoothing moves one scale from the norm into those columns, the rotation rotates them;
their outputs are unchanged, so the q/k norms, the per-head sigmoid gate and the clamped SwiGLU after them see the
same numbers: exact. Not described, because they would not be exact or cannot be expressed: up -> down smoothing
(`up` is clamped to ±swiglu_limit before the product, and a clamp does not commute with a scale), and the v -> o
smoothing and value-head rotation (sliding layers have another head count than full ones, while the per-head
algorithms take one attention shape: `attention_shape()` is None).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model.block_arguments import EveryBlockArguments
from msmodelslim.model.checkpoint import read_json
from msmodelslim.model.hf_config import model_load_errors, require_local_dir
from msmodelslim.model.interface import AttentionShape, ModelStructure, SmoothSubgraph, gqa_attention_subgraphs
from msmodelslim.model.rotation import BlockPart, decoder_rotation, gated_mlp, routed_experts
from msmodelslim.model.moe import (StackedSlice, UnfusedExperts, is_fused_experts, stacked_per_projection_source,
                                  stacked_source)
from msmodelslim.model.skeleton_edits import move_buffer, rename_child
from msmodelslim.model.transformers_model import TransformersModel

MOE_BLOCK, SHARED_EXPERT, ROUTER_BIAS = "moe", "share_expert", "router_bias"
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj", "g_proj")
# norm -> readers only: a dense layer's `mlp`, or a sparse layer's router + experts + shared expert (one scale)
STEP35_SMOOTHING = gqa_attention_subgraphs(readers=ATTENTION_READERS, value=None) + (
    SmoothSubgraph("norm-linear", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothSubgraph("norm-linear", "post_attention_layernorm", (
        f"{MOE_BLOCK}.gate", f"{MOE_BLOCK}.experts.*.gate_proj", f"{MOE_BLOCK}.experts.*.up_proj",
        f"{MOE_BLOCK}.{SHARED_EXPERT}.gate_proj", f"{MOE_BLOCK}.{SHARED_EXPERT}.up_proj")),
)
STEP35_ROTATION = decoder_rotation(
    attention=[BlockPart(tuple(f"self_attn.{n}" for n in ATTENTION_READERS), ("self_attn.o_proj",))],
    mlp=[gated_mlp(), routed_experts(MOE_BLOCK), gated_mlp(f"{MOE_BLOCK}.{SHARED_EXPERT}")],
    norm_offset=1.0,
)


def _causal_lm_class():
    """Step3p5ForCausalLM: transformers' Step-3.5-shaped text model with an lm_head (built on first use)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7PreTrainedModel, Step3p7TextModel

    class Step3p5ForCausalLM(Step3p7PreTrainedModel):
        config_class = Step3p7TextConfig  # (no `config:` annotation: transformers evaluates it in module scope)
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config: Step3p7TextConfig) -> None:
            super().__init__(config)
            self.model = Step3p7TextModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

        def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, use_cache: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs).last_hidden_state
            return CausalLMOutputWithPast(logits=self.lm_head(hidden))

    return Step3p5ForCausalLM


@lru_cache(maxsize=None)
def register_causal_lm() -> type:
    """Teach AutoModelForCausalLM the step3p5 config (transformers' own extension point), once; the class."""
    from transformers import AutoModelForCausalLM
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    causal_lm = _causal_lm_class()
    AutoModelForCausalLM.register(Step3p7TextConfig, causal_lm, exist_ok=True)
    return causal_lm


def unsupported_step_config(config: dict, where: str) -> Optional[str]:
    """What of a Step-3.5 config.json transformers' Step3p7 text model cannot express, or None."""
    if config.get("att_impl_type", "GQA") != "GQA":
        return f"{where}: att_impl_type {config['att_impl_type']!r} (only GQA is built by transformers)"
    other = config.get("attention_other_setting") or {}
    for key, full in (("num_attention_groups", config.get("num_attention_groups")), ("head_dim", config.get("head_dim"))):
        if key in other and full is not None and other[key] != full:
            return (f"{where}: attention_other_setting.{key} {other[key]} differs from {key} {full}; transformers' "
                    f"Step3p7 text model changes only the head count of sliding layers")
    rope_layers = config.get("use_rope_layers")
    if rope_layers and not all(rope_layers):
        return f"{where}: use_rope_layers turns RoPE off in some layers, which transformers' Step3p7 does not do"
    return None


class Step35FlashAdapter(EveryBlockArguments, TransformersModel):
    structure = ModelStructure(hf_model_types=("step3p5",),
                               fused_groups=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
                               smooth_subgraphs=STEP35_SMOOTHING, norm_offset=1.0, rotation=STEP35_ROTATION)

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        config_file = require_local_dir(model_path, "--model_path") / "config.json"
        problem = unsupported_step_config(read_json(config_file), str(config_file)) if config_file.is_file() else None
        if problem:
            raise UnsupportedError(f"--model_type {model_type}: {problem}. Nothing was read")
        register_causal_lm()
        super().__init__(model_type, model_path, trust_remote_code)
        self._stored = set(self.stored_names())

    def read_config(self) -> Any:
        """transformers' own Step3p7TextConfig, never the checkpoint's configuration code (auto_map is dropped, so
        the model is always Step3p5ForCausalLM above). Its head count is per layer (sliding layers differ), so
        the generic reader's global size checks do not apply."""
        from transformers import AutoConfig

        config_file = self.model_path / "config.json"
        with model_load_errors(self.model_path, f"{config_file} is not a config transformers can load (fix it, or "
                                                f"download the model again)"):
            config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=False, local_files_only=True)
        if type(config).__name__ != "Step3p7TextConfig":
            raise UnsupportedError(f"{config_file} is not a Step-3.5 text config (got {type(config).__name__}); "
                                   f"--model_type Step-3.5-Flash reads model_type step3p5")
        config.auto_map = {}
        return config

    def attention_shape(self) -> AttentionShape | None:
        return None  # the head count differs between full and sliding layers

    def prepare_skeleton(self, model: nn.Module) -> None:
        for layer in model.get_submodule(self.structure.decoder_layers):
            block = layer.mlp
            if not is_fused_experts(getattr(block, "experts", None)):
                continue  # a dense layer keeps `mlp`
            experts = block.experts
            limit = experts.limit if experts.limit != float("inf") else None
            block.experts = UnfusedExperts.from_fused(experts, limit=limit)  # the clamped SwiGLU, per expert
            rename_child(block, "shared_experts", SHARED_EXPERT)
            move_buffer(block.gate, "e_score_correction_bias", block, ROUTER_BIAS)
            rename_child(layer, "mlp", MOE_BLOCK)

    def stacked_source(self, name: str) -> StackedSlice | None:
        """The published layout stacks each projection (`moe.gate_proj.weight` [E, I, H]); transformers'
        (`moe.experts.gate_up_proj`) is accepted too, when the checkpoint has that instead."""
        separate = stacked_per_projection_source(name)
        if separate is not None and separate.tensor in self._stored:
            return separate
        return stacked_source(name)
