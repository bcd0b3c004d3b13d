"""What the Qwen vision-language adapters (model/vlm.py and the families built on it) know about a model as data:
the family (which vision linears write into the text residual stream, experts, q/k norms), where the language
model and the vision tower sit in the module tree (= the checkpoint's names), the structure the processors read
(text-decoder smoothing and rotation, plus the vision outputs rotated with the stream), and Qwen3-VL-MoE's
transposed stacked experts."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from msmodelslim.model.interface import ModelStructure, dense_mlp_subgraphs, gqa_attention_subgraphs, moe_mlp_subgraphs
from msmodelslim.model.kv_cache import LLAMA_KV_CACHE, QWEN3_KV_CACHE
from msmodelslim.model.moe import StackedSlice
from msmodelslim.model.rotation import decoder_rotation, gated_mlp, gqa_attention, routed_experts
from msmodelslim.model.skeleton_edits import relocate

# Published layout of Qwen2-VL / Qwen2.5-VL checkpoints: {transformers module path: published path}
LEGACY_TEXT_CHILDREN = ("embed_tokens", "layers", "norm", "rotary_emb")


@dataclass(frozen=True)
class VlmFamily:
    """What differs between the Qwen vision-language families, as data. Names are relative to the vision tower
    (`visual`); `*` stands for every index of a module list."""

    hf_model_type: str
    # Linears of the vision tower whose outputs are added into the text residual stream (the merger scattered
    # into the embeddings; DeepStack mergers added after the first layers): QuaRot rotates their output rows.
    stream_writers: tuple[str, ...]
    moe: bool = False
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3): the C8 KV cache reads the normed keys


QWEN2_5_VL = VlmFamily("qwen2_5_vl", stream_writers=("merger.mlp.2",))
QWEN3_VL = VlmFamily("qwen3_vl", stream_writers=("merger.linear_fc2", "deepstack_merger_list.*.linear_fc2"),
                     qk_norm=True)
QWEN3_VL_MOE = replace(QWEN3_VL, hf_model_type="qwen3_vl_moe", moe=True)


@dataclass(frozen=True)
class VlmLayout:
    """Where the language model and the vision tower sit in the module tree (= the checkpoint's names)."""

    text: str  # holds embed_tokens, layers, norm
    vision: str

    @property
    def decoder_layers(self) -> str:
        return f"{self.text}.layers"


PUBLISHED_QWEN2_VL = VlmLayout(text="model", vision="visual")  # Qwen2-VL / Qwen2.5-VL as published
TRANSFORMERS_5 = VlmLayout(text="model.language_model", vision="model.visual")  # Qwen3-VL as published


def vlm_structure(family: VlmFamily, layout: VlmLayout) -> ModelStructure:
    """The family's structure under `layout`: text-decoder smoothing and rotation, plus the vision outputs that
    write into the rotated residual stream."""
    mlp = [gated_mlp(), routed_experts()] if family.moe else [gated_mlp()]
    smooth = gqa_attention_subgraphs() + dense_mlp_subgraphs() + (moe_mlp_subgraphs() if family.moe else ())
    rotation = decoder_rotation(attention=[gqa_attention()], mlp=mlp, embedding=f"{layout.text}.embed_tokens",
                                final_norm=f"{layout.text}.norm")
    rotation = replace(rotation, outside_writers=tuple(f"{layout.vision}.{w}" for w in family.stream_writers))
    return ModelStructure(decoder_layers=layout.decoder_layers, hf_model_types=(family.hf_model_type,),
                          smooth_subgraphs=smooth, rotation=rotation,
                          kv_cache=QWEN3_KV_CACHE if family.qk_norm else LLAMA_KV_CACHE)


def published_qwen2_vl_layout(outer: nn.Module, inner: nn.Module, towers: Sequence[str] = ("visual",)) -> None:
    """Qwen2-VL-style published names: the towers (transformers 5: `inner.<tower>`) next to `inner` in `outer`, and
    the language model's children (`inner.language_model.*`) directly under `inner`."""
    for tower in towers:
        relocate(inner, tower, outer, tower)
    for child in LEGACY_TEXT_CHILDREN:
        relocate(inner.language_model, child, inner, child)


@dataclass(frozen=True)
class TransposedStackedSlice(StackedSlice):
    """A per-expert weight in experts stacked transposed (Qwen3-VL-MoE as published: gate_up_proj [E, H, 2I] with
    gate columns then up columns, down_proj [E, I, H]): the expert's matrix transposed to [out, in], then cut. A
    checkpoint re-saved by transformers 5 holds transformers' layout ([E, 2I, H], [E, H, I]): told apart by where
    the hidden size is (a square gate_up_proj, 2I = H, is read as published)."""

    hidden: int = 0

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        matrix = stacked[self.index]
        published = matrix.shape[-1 if self.part is None else 0] == self.hidden  # down [I, H]; gate_up [H, 2I]
        matrix = matrix.T if published else matrix
        if self.part is not None:
            half = matrix.shape[0] // 2
            matrix = matrix[self.part * half : (self.part + 1) * half]
        return matrix.contiguous().clone()
