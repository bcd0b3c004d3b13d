"""LongCat-Flash (longcat_flash, LongCat-Flash-Chat): each decoder layer holds two MLA attentions (`self_attn.0`,
`self_attn.1`, DeepSeek-V3's projection names), two dense MLPs (`mlps.0`, `mlps.1`) and one shortcut-connected
MoE (`mlp`) whose router (`mlp.router.classifier`, softmax with a correction bias) picks among the routed experts
and `zero_expert_num` zero-computation experts that return their input.

The routed experts are split per expert under the on-disk names (`mlp.experts.E.{gate,up,down}_proj`); the
zero-computation experts have no weights and stay part of the routed sum (moe.UnfusedExpertsWithIdentity). The
router's classifier stays float (the engine builds it without quantization). vLLM fuses q_a_proj with
kv_a_proj_with_mqa and gate_proj with up_proj.

Smoothing (`longcat_smoothing`): each of the two sublayers is DeepSeek-V3's MLA subgraphs under
`input_layernorm.<i>` / `self_attn.<i>`, then `post_attention_layernorm.<i>` feeding `mlps.<i>`; the first one also
feeds the shortcut MoE (router columns and every expert's gate/up take the same scale), and each expert's up ->
down is smoothed from the tokens routed to it. When the checkpoint has zero-computation experts they return the
normed input itself, so a scale moved out of `post_attention_layernorm.0` would change their output: that one norm
is then left unsmoothed (logged), which keeps every transform exact in float. QuaRot is not described for the same
reason (folding that norm's gain into its readers changes what the identity experts return).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.interface import (AttentionShape, ModelStructure, SmoothSubgraph, dense_mlp_subgraphs,
                                         mla_attention_subgraphs, moe_mlp_subgraphs)
from msmodelslim.model.moe import (UnfusedExperts, UnfusedExpertsSkippingZeroWeights, UnfusedExpertsWithIdentity,
                                   is_fused_experts)
from msmodelslim.model.skeleton_edits import keep_float
from msmodelslim.model.transformers_model import TransformersModel

log = get_logger("model.longcat")

ENGINE_FLOAT = ("*.mlp.router.classifier",)
SHORTCUT_NORM = "post_attention_layernorm.0"  # feeds the shortcut MoE and mlps.0


def longcat_smoothing(identity_experts: bool) -> tuple[SmoothSubgraph, ...]:
    """The smoothing subgraphs of a LongCat-Flash decoder layer (names relative to it); `identity_experts`: the
    MoE has zero-computation experts, which read SHORTCUT_NORM's output directly (it then keeps scale 1)."""
    graphs: list[SmoothSubgraph] = []
    for i in (0, 1):
        graphs += mla_attention_subgraphs(norm=f"input_layernorm.{i}", attn=f"self_attn.{i}")
        mlp_norm, mlp_up_down = dense_mlp_subgraphs(norm=f"post_attention_layernorm.{i}", mlp=f"mlps.{i}")
        if i == 1:
            graphs += [mlp_norm, mlp_up_down]
            continue
        moe_norm, experts_up_down = moe_mlp_subgraphs(norm=SHORTCUT_NORM, mlp="mlp", router="router.classifier")
        if not identity_experts:  # one scale for the MoE's readers and mlps.0's
            graphs.append(replace(moe_norm, targets=moe_norm.targets + mlp_norm.targets))
        graphs += [mlp_up_down, experts_up_down]
    return tuple(graphs)


def unfuse_longcat_experts(model: nn.Module) -> int:
    """Replace every LongCat experts module by per-expert linears; returns how many. Two layouts:
    - transformers < 5.25: the experts module holds the zero-computation experts too (`identity_expert`, and
      gate_up_proj rows for them that are never used): only the routed experts (down_proj's first dimension)
      become modules, and the identity picks are computed beside them;
    - transformers >= 5.25: the MoE adds the zero-computation experts' output itself and passes their picks to
      the routed experts with weight 0, which are then not forwarded (UnfusedExpertsSkippingZeroWeights)."""
    fused = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, module in fused:
        moves_identity_outside = module.gate_up_proj.shape[0] == module.down_proj.shape[0]
        if getattr(module, "has_bias", False) or not (hasattr(module, "identity_expert") or moves_identity_outside):
            raise UnsupportedError(f"{name} ({type(module).__name__}) is not LongCat's experts layout (routed "
                                   f"gate/up/down experts without biases plus identity experts)")
        parent, _, child = name.rpartition(".")
        identity = int(getattr(module, "zero_expert_num", 0) or 0)
        if not hasattr(module, "identity_expert"):
            unfused = UnfusedExpertsSkippingZeroWeights.from_fused(module)
        elif identity:
            unfused = UnfusedExpertsWithIdentity.from_fused(module, num_identity=identity)
        else:
            unfused = UnfusedExperts.from_fused(module)
        setattr(model.get_submodule(parent), child, unfused)
    return len(fused)


class LongcatFlashAdapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("longcat_flash",),
                               fused_groups=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),
                               smooth_subgraphs=longcat_smoothing(identity_experts=True))

    def __init__(self, model_type: str, model_path: str | Path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        identity = int(getattr(self.config, "zero_expert_num", 0) or 0) > 0
        self.structure = replace(self.structure, smooth_subgraphs=longcat_smoothing(identity))
        if identity:
            log.info("LongCat-Flash: %s is not smoothed: its %d zero-computation experts return that norm's "
                     "output, which a smoothing scale would change", SHORTCUT_NORM, self.config.zero_expert_num)

    def prepare_skeleton(self, model: nn.Module) -> None:
        unfuse_longcat_experts(model)
        keep_float(model, ENGINE_FLOAT)

    def attention_shape(self) -> AttentionShape | None:
        return None  # MLA: no per-head v_proj/o_proj pair
