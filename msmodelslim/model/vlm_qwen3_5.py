"""Qwen3.5 / Qwen3.6 (adapter key qwen3_5_moe): image-text models whose text decoder is Qwen3-Next's hybrid, dense
(config.json model_type `qwen3_5`: Qwen3.5-27B, Qwen3.6-27B) or with routed experts (`qwen3_5_moe`: Qwen3.5-35B-A3B,
122B-A10B, 397B-A17B). The vision tower is Qwen3-VL's without DeepStack; the pipeline is model/vlm.py's (the tower
is the first block, then the text decoder layers one at a time).

Names (= the published checkpoints, = what vLLM reads): transformers' own, `model.visual.*`,
`model.language_model.*`, `lm_head.*` (the VLM layout of Qwen3-VL). The linear attention is published split:
`linear_attn.in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a` (vLLM fuses qkv+z into in_proj_qkvz and b+a into
in_proj_ba, so each pair shares one scheme: `fused_groups`), then `out_proj`. Experts: transformers (and its
conversion mapping for these classes) saves them per expert, `mlp.experts.<e>.{gate,up,down}_proj.weight`; a
checkpoint stacked as transformers holds them in memory (`experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
which vLLM also reads without transposing) loads too. They are unfused into one nn.Linear per expert and written
per expert (formats.md A.5), as for the text MoE families.

What stays float, always (as for Qwen3-Next, model/qwen_next.py): `linear_attn.in_proj_b` / `in_proj_a` (the
per-head beta/alpha gates) and `mlp.shared_expert_gate`, which the engine builds without quantization; conv1d,
A_log, dt_bias and the gated norm are parameters, not linears. The multi-token-prediction module (`mtp.*`, one
layer in the published checkpoints) is not part of the model transformers builds: it is passed through unchanged,
FLOAT (model/passthrough.py), and vLLM loads it into its draft model.

Calibration: a decoder layer runs on the arguments the model passes its first text layer. Linear- and
full-attention layers get different masks from the text model (a causal mask; a padding mask for the recurrent
layers); a VLM sample is one unpadded sequence (samples are not batched), for which the recurrent layers ignore
their mask, so both kinds run on the causal mask of the first full-attention layer (`_layer_mask`), the mask
transformers gives that layer.

Smoothing (iter_smooth, flex_smooth_quant) as for Qwen3-Next: every norm scales by (1 + weight); the input norm feeds
q/k/v or the linear attention's four input projections, the post-attention norm the MLP or the router, experts,
shared expert and its gate; v_proj -> o_proj is exact through the sigmoid output gate.

Rotation (quarot) as for Qwen3-Next, plus the vision merger: the same readers fold their norm's gain (1 + weight)
and rotate their columns, the norm is left with gain exactly 1 (stored weight 0: `norm_offset=1.0`); o_proj,
out_proj, down_proj (dense, shared and every routed expert) rotate their rows; the embedding's rows and the head's
columns rotate, and so do the output rows of `model.visual.merger.linear_fc2`, whose image embeddings are scattered
into the residual stream (`outside_writers`). No value-head rotation: the full attention's sigmoid output gate acts on
the heads' channels, and the linear attention's value path runs through a gated RMSNorm per head. Everything the
rotation touches is a linear of the normed residual (or writes it), so the conv1d and delta rule, the q/k norms and
the gates see the same numbers: exact in float. The MTP module (`mtp.*`) is not rotated and cannot be made exact:
vLLM feeds it the main model's (rotated) embedding and post-final-norm hidden state and sends its own norm's output
into the main model's head, into which the rotation folded the final norm's gain. core/passthrough.py refuses quarot
on a checkpoint that holds it, before any weight is read.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError, ProcessingError
from msmodelslim.model.interface import ModelStructure, dense_mlp_subgraphs, gqa_attention_subgraphs, moe_mlp_subgraphs
from msmodelslim.model.moe import StackedSlice, stacked_source
from msmodelslim.model.rotation import (BlockPart, RotationStructure, decoder_rotation, gated_mlp, gqa_attention,
                                        routed_experts)
from msmodelslim.model.skeleton_edits import keep_float
from msmodelslim.model.vlm import VlmAdapter
from msmodelslim.model.vlm_structure import TRANSFORMERS_5, VlmFamily, VlmLayout

QWEN3_5 = VlmFamily("qwen3_5", stream_writers=("merger.linear_fc2",))
QWEN3_5_MOE = replace(QWEN3_5, hf_model_type="qwen3_5_moe", moe=True)
FAMILIES = {f.hf_model_type: f for f in (QWEN3_5, QWEN3_5_MOE)}

ENGINE_FLOAT = ("*.linear_attn.in_proj_b", "*.linear_attn.in_proj_a", "*.mlp.shared_expert_gate")
LINEAR_ATTENTION_READERS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
SHARED_EXPERT_GATE = "shared_expert_gate"
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"),
         ("in_proj_b", "in_proj_a"))


def qwen3_5_rotation(family: VlmFamily, layout: VlmLayout) -> RotationStructure:
    """The residual stream's readers and writers (see the module docstring): Qwen3-Next's, the vision merger too."""
    linear_attention = BlockPart(tuple(f"linear_attn.{n}" for n in LINEAR_ATTENTION_READERS), ("linear_attn.out_proj",))
    mlp = ([routed_experts(), gated_mlp("mlp.shared_expert"), BlockPart((f"mlp.{SHARED_EXPERT_GATE}",))] if family.moe
           else [gated_mlp()])
    rotation = decoder_rotation(attention=[gqa_attention(rotate_heads=False), linear_attention], mlp=mlp,
                                embedding=f"{layout.text}.embed_tokens", final_norm=f"{layout.text}.norm",
                                norm_offset=1.0)
    return replace(rotation, outside_writers=tuple(f"{layout.vision}.{w}" for w in family.stream_writers))


def qwen3_5_structure(family: VlmFamily, layout: VlmLayout) -> ModelStructure:
    """Hybrid text decoder: each layer has full attention (`self_attn`) or linear attention (`linear_attn`), the
    other subgraph is skipped there; a dense MLP or a sparse MoE with a gated shared expert."""
    smooth = (gqa_attention_subgraphs()
              + gqa_attention_subgraphs(attn="linear_attn", readers=LINEAR_ATTENTION_READERS, value=None)
              + (moe_mlp_subgraphs(shared="shared_expert", extra_readers=(SHARED_EXPERT_GATE,)) if family.moe
                 else dense_mlp_subgraphs()))
    return ModelStructure(decoder_layers=layout.decoder_layers, hf_model_types=tuple(FAMILIES),
                          fused_groups=FUSED, row_parallel=("o_proj", "down_proj", "out_proj"),
                          smooth_subgraphs=smooth, norm_offset=1.0,
                          rotation=qwen3_5_rotation(family, layout), kv_cache=None)


class Qwen35VlAdapter(VlmAdapter):
    """Qwen3.5-27B / Qwen3.6-27B (dense) and Qwen3.5-35B-A3B / 122B-A10B / 397B-A17B (MoE): see the module
    docstring. Which one is config.json's model_type."""

    family = QWEN3_5_MOE
    structure = qwen3_5_structure(QWEN3_5_MOE, TRANSFORMERS_5)

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self.family = FAMILIES[self.config.model_type]  # hf_model_types admitted only these two
        if self.layout != TRANSFORMERS_5:
            raise InvalidModelError(f"{self.model_path}: a {self.family.hf_model_type} checkpoint is published "
                                    f"with model.language_model.* and model.visual.*; this one is laid out as "
                                    f"Qwen2.5-VL (model.layers.*, visual.*)")
        self.structure = qwen3_5_structure(self.family, self.layout)

    def stacked_source(self, name: str) -> StackedSlice | None:
        """Stacked experts are in transformers' layout ([E, 2I, H], [E, H, I]), not Qwen3-VL-MoE's transposed one."""
        return stacked_source(name)

    def prepare_skeleton(self, model: nn.Module) -> None:
        super().prepare_skeleton(model)
        keep_float(model, ENGINE_FLOAT)

    def _capture(self, model: nn.Module, batch: dict[str, torch.Tensor], token_embeddings=None,
                 vision_output=None):
        args, kwargs, text_kwargs = super()._capture(model, batch, token_embeddings, vision_output)
        return args, {**kwargs, "attention_mask": self._layer_mask(model, args[0], kwargs, text_kwargs)}, text_kwargs

    def _layer_mask(self, model: nn.Module, hidden: torch.Tensor, kwargs: dict, text_kwargs: dict):
        """The mask transformers gives a full-attention layer of this one-sequence sample (see the module
        docstring); every layer runs on it."""
        from transformers.masking_utils import create_causal_mask

        if hidden.shape[0] != 1:
            raise ProcessingError(f"qwen3_5: a calibration input holds {hidden.shape[0]} sequences; the linear-"
                                    f"attention layers need one unpadded sequence per input")
        text_config = self.language_model(model).config
        position_ids = kwargs.get("position_ids")
        return create_causal_mask(config=text_config, inputs_embeds=hidden,
                                  attention_mask=text_kwargs.get("attention_mask"), cache=None,
                                  position_ids=position_ids)
