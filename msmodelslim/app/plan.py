"""The layer plan: which scheme every linear will be written with, decided on the empty (meta-device) model
before any weight is read, with the rule problems that can be seen there (a layer matched twice, a group size
that does not divide a layer, static activations on routed experts, rules that reach outside the decoder
layers)."""
from __future__ import annotations

from collections import Counter

from torch import nn

from msmodelslim.core.config import PracticeConfig
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.tensors import FLAT_INNER_TAGS, flat_tag, svd_tag
from msmodelslim.ir.flat_transform import flat_dims
from msmodelslim.ir.sparse_linear import W16A16S
from msmodelslim.model.interface import ModelStructure
from msmodelslim.model.moe import routed_expert_linears
from msmodelslim.processor.base import Processor, quant_rules
from msmodelslim.processor.matching import select, unused_patterns
from msmodelslim.processor.registry import DoubleMatchError, merge_claims
from msmodelslim.quantizer.float_formats import MX_BLOCK
from msmodelslim.quantizer.nvfp4 import NVFP4_BLOCK
from msmodelslim.quantizer.scheme import Scheme

log = get_logger("app.plan")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _refuse_static_experts(leaf, selected: list[str], experts: dict[str, tuple[str, int]]) -> None:
    """Static activation ranges (W8A8) on routed experts: no serving kernel exists (formats.md A.5)."""
    routed = [n for n in selected if n in experts]
    if not leaf.qconfig.static_act or not routed:
        return
    layer = experts[routed[0]][0]
    raise ConfigError(
        f"the rule include={leaf.include} exclude={leaf.exclude} gives static activation quantization "
        f"({leaf.qconfig.scheme.value}) to {len(routed)} routed expert linears such as {routed[0]} "
        f"(pattern '{layer}.*'); no serving kernel runs static-activation MoE experts. Add '*.mlp.experts.*' to "
        f"this rule's exclude and quantize the experts in their own rule with dynamic activations "
        f"(act: {{dtype: int8, scope: per_token, symmetric: true}}: W8A8_DYNAMIC or W4A8_DYNAMIC)"
    )


def _outside_blocks(names: list[str], blocks: list[str]) -> set[str]:
    return {n for n in names if not any(n.startswith(b + ".") for b in blocks)}


def _sparse_rules(configs) -> list:
    """Every float_sparse step (also inside groups): they write W16A16S, no qconfig involved."""
    out = []
    for c in configs:
        if c.type == "group":
            out.extend(_sparse_rules(c.configs))
        elif c.type == "float_sparse":
            out.append(c)
    return out


def _leaf_steps(configs) -> list:
    """Every step in pipeline order, the children of groups in their place."""
    out = []
    for c in configs:
        out.extend(_leaf_steps(c.configs) if c.type == "group" else [c])
    return out


def _mark_svd_splits(configs, plan: dict[str, str], names: list[str], outside: set[str]) -> None:
    """A linear that an svd_res step selects and a later rule quantizes is written with its type's _SVD variant
    (formats.md A.4.4); one that stays float is not split (processor/svd_res)."""
    steps = _leaf_steps(configs)
    for i, step in enumerate(steps):
        if step.type != "svd_res":
            continue
        later = quant_rules(steps[i + 1 :])
        for name in select(names, step.include, step.exclude):
            if name not in outside and any(select([name], r.include, r.exclude) for r in later):
                plan[name] = svd_tag(plan[name])
        for pattern in unused_patterns(names, step.include + step.exclude):
            log.warning("pattern %r of an svd_res step matches no linear layer", pattern)


def _mark_flat_transforms(configs, plan: dict[str, str], names: list[str], outside: set[str], model: nn.Module,
                          experts: dict[str, tuple[str, int]], structure: ModelStructure) -> None:
    """A linear that a flatquant step selects is written with the _FLATQUANT variant of its type (formats.md
    A.4.8): W4A4_DYNAMIC or W4A4_MXFP4 behind it, as the training assumes. Anything else, a float layer included,
    and an input size for which the engine's loader has no transform shape (ir/flat_transform.flat_dims; for a
    row-parallel layer, as `structure` names them) are refused here, before any weight is read."""
    steps = _leaf_steps(configs)
    for i, step in enumerate(steps):
        if step.type != "flatquant":
            continue
        for name in select(names, step.include, step.exclude):
            if name in outside:
                continue
            if name in experts:
                raise ConfigError(f"flatquant selects {name}, a routed expert: FlatQuant is implemented for dense "
                                  f"linears (the engine's fused MoE kernels take no transform); add the experts to "
                                  f"flatquant's exclude, e.g. \"*experts*\"")
            if plan[name] not in FLAT_INNER_TAGS:
                later = [r for r in quant_rules(steps[i + 1 :]) if select([name], r.include, r.exclude)]
                what = "no later rule quantizes it" if not later else f"a later rule makes it {plan[name]}"
                raise ConfigError(
                    f"flatquant selects layer {name}, but {what}: FlatQuant is implemented for W4A4_DYNAMIC "
                    f"(int4 per_channel symmetric weights, int4 per_token activations) and W4A4_MXFP4 (mxfp4 "
                    f"per_block weights and activations) behind it, from a linear_quant after flatquant; float "
                    f"layers behind a transform are not implemented. Quantize the layer so, or exclude it from "
                    f"flatquant")
            in_features = model.get_submodule(name).in_features
            try:
                flat_dims(in_features, plan[name] == Scheme.W4A4_MXFP4.value,
                          structure.is_row_parallel(name))
            except ValueError as exc:
                raise ConfigError(f"flatquant cannot transform layer {name} for {flat_tag(plan[name])}: {exc}; "
                                  f"exclude the layer from flatquant") from None
            plan[name] = flat_tag(plan[name])
        for pattern in unused_patterns(names, step.include + step.exclude):
            log.warning("pattern %r of a flatquant step matches no linear layer", pattern)


def plan_layers(config: PracticeConfig, processors: list[Processor], model: nn.Module,
                blocks: list[str], structure: ModelStructure = ModelStructure()) -> dict[str, str]:
    """{linear name: scheme} for every linear, as it will be written (FLOAT when no rule matches, and for linears
    outside the decoder `blocks`, which the runner never visits: lm_head); rejects double matches, group sizes
    that do not divide a layer and static activations on routed experts, naming the layer."""
    names = _linear_names(model)
    outside = _outside_blocks(names, blocks)
    try:
        merge_claims([(f"spec.process[{i}]", p.claims(names)) for i, p in enumerate(processors)])
    except DoubleMatchError as exc:
        raise ConfigError(str(exc)) from None
    plan = {n: "FLOAT" for n in names}
    group_sizes = set()
    experts = routed_expert_linears(model)
    for leaf in quant_rules(config.spec.process):
        selected = select(names, leaf.include, leaf.exclude)
        skipped = sorted(outside.intersection(selected))
        if skipped:
            log.warning("a rule (include=%s, exclude=%s) matches %s, outside the decoder layers: it stays in float "
                        "(only decoder-layer linears are quantized); add it to exclude to silence this",
                        leaf.include, leaf.exclude, ", ".join(skipped))
            selected = [n for n in selected if n not in outside]
        _refuse_static_experts(leaf, selected, experts)
        for name in selected:
            plan[name] = leaf.qconfig.scheme.value
            group = leaf.qconfig.weight.group_size
            if leaf.qconfig.weight.dtype.is_mx or leaf.qconfig.act.dtype.is_mx:
                group = MX_BLOCK
                group_sizes.add(group)
                in_features = model.get_submodule(name).in_features
                if in_features % group:  # the kernels quantize activations per block of 32 too (A5 needs K % 32)
                    raise ConfigError(f"{plan[name]} needs the input size of layer {name} ({in_features}) to be a "
                                      f"multiple of the MX block {MX_BLOCK}; exclude the layer")
                if leaf.qconfig.weight.method == "dualscale":
                    dual = leaf.qconfig.weight.ext["dual_block_size"]
                    if in_features > dual and in_features % dual:  # see quantizer/dualscale.effective_dual_block
                        raise ConfigError(
                            f"W4A4_MXFP4_DUALSCALE: dual_block_size {dual} neither divides nor exceeds the input size "
                            f"{in_features} of layer {name}; the checkpoint does not record dual_block_size, so a "
                            f"partial last block could not be read back unambiguously. Choose a divisor of "
                            f"{in_features} that is a multiple of 32, or exclude the layer")
            elif leaf.qconfig.weight.dtype.value == "nvfp4":  # not an ascendv1 group: no group_size entry
                in_features = model.get_submodule(name).in_features
                if in_features % NVFP4_BLOCK:
                    raise ConfigError(f"{plan[name]} needs the input size of layer {name} ({in_features}) to be a "
                                      f"multiple of the NVFP4 block {NVFP4_BLOCK}; exclude the layer")
            elif group:
                group_sizes.add(group)
                in_features = model.get_submodule(name).in_features
                if in_features % group:
                    raise ConfigError(
                        f"group_size {group} does not divide the input size {in_features} of layer {name}; "
                        f"choose a divisor of {in_features} or exclude the layer"
                    )
        for pattern in unused_patterns(names, leaf.include + leaf.exclude):
            log.warning("pattern %r of a quantization rule matches no linear layer", pattern)
    if len(group_sizes) > 1:
        raise ConfigError(f"ascendv1 stores one group_size per model, but the config uses {sorted(group_sizes)}")
    _mark_svd_splits(config.spec.process, plan, names, outside)
    _mark_flat_transforms(config.spec.process, plan, names, outside, model, experts, structure)
    for rule in _sparse_rules(config.spec.process):  # its empty include means every decoder-layer linear
        include, exclude = rule.selection
        for name in select(names, include, exclude):
            if name not in outside:
                plan[name] = W16A16S
        for pattern in unused_patterns(names, rule.include + rule.exclude):
            log.warning("pattern %r of a float_sparse step matches no linear layer", pattern)
    for processor in processors:  # e.g. smoothing subgraphs that this model's modules do not have
        processor.check_model(model, blocks)
    return plan


def summarize_plan(plan: dict[str, str]) -> str:
    counts = Counter(plan.values())
    float_layers = [n for n, s in plan.items() if s == "FLOAT"]
    text = ", ".join(f"{scheme} x{count}" for scheme, count in sorted(counts.items()))
    shown = ", ".join(float_layers[:6]) + (" ..." if len(float_layers) > 6 else "")
    return f"{len(plan)} linear layers: {text}" + (f"; kept in float: {shown}" if float_layers else "")
