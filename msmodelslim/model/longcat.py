"""LongCat-Flash (longcat_flash, LongCat-Flash-Chat): each decoder layer holds two MLA attentions (`self_attn.0`,
`self_attn.1`, DeepSeek-V3's projection names), two dense MLPs (`mlps.0`, `mlps.1`) and one shortcut-connected
MoE (`mlp`) whose router (`mlp.router.classifier`, softmax with a correction bias) picks among the routed experts
and `zero_expert_num` zero-computation experts that return their input.

The routed experts are split per expert under the on-disk names (`mlp.experts.E.{gate,up,down}_proj`); the
zero-computation experts have no weights and stay part of the routed sum (moe.UnfusedExpertsWithIdentity). The
router's classifier stays float (the engine builds it without quantization). vLLM fuses q_a_proj with
kv_a_proj_with_mqa and gate_proj with up_proj. Smoothing subgraphs and rotations are not described yet (two
attentions and MLPs per layer need their own structure): those processors refuse by name.
"""
from __future__ import annotations

from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model.interface import AttentionShape, ModelStructure
from msmodelslim.model.moe import UnfusedExperts, UnfusedExpertsWithIdentity, is_fused_experts
from msmodelslim.model.skeleton_edits import keep_float
from msmodelslim.model.transformers_model import TransformersModel

ENGINE_FLOAT = ("*.mlp.router.classifier",)


def unfuse_longcat_experts(model: nn.Module) -> int:
    """Replace every LongCat experts module (fused routed experts plus zero-computation experts) by per-expert
    linears; returns how many. The fused module keeps gate_up_proj rows for the zero-computation experts too
    (never used): only the routed experts (down_proj's first dimension) become modules."""
    fused = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, module in fused:
        if getattr(module, "has_bias", False) or not hasattr(module, "identity_expert"):
            raise UnsupportedError(f"{name} ({type(module).__name__}) is not LongCat's experts layout (routed "
                                   f"gate/up/down experts without biases plus identity experts)")
        parent, _, child = name.rpartition(".")
        identity = int(getattr(module, "zero_expert_num", 0) or 0)
        cls = UnfusedExpertsWithIdentity if identity else UnfusedExperts
        kwargs = {"num_identity": identity} if identity else {}
        setattr(model.get_submodule(parent), child, cls.from_fused(module, **kwargs))
    return len(fused)


class LongcatFlashAdapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("longcat_flash",),
                               fused_groups=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")))

    def prepare_skeleton(self, model: nn.Module) -> None:
        unfuse_longcat_experts(model)
        keep_float(model, ENGINE_FLOAT)

    def attention_shape(self) -> AttentionShape | None:
        return None  # MLA: no per-head v_proj/o_proj pair
