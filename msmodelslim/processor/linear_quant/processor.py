"""`linear_quant`: quantization of linear layers with one qconfig.

Weights, by `weight.method`: `minmax` (round to nearest with min/max ranges, per channel or group), `ssz`
(ranges searched to minimise the reconstruction error, quantizer/ssz.py) or `gptq` (Hessian-based error
feedback on the calibration inputs, quantizer/gptq.py). Static activations (W8A8), by `act.method`: `minmax`
(min/max of the layer's input over the calibration data) or `histogram` (the L2-optimal clipping range).
Dynamic activations (per_token) need no data: the kernel measures each token at run time.

Routed MoE experts may receive no calibration tokens at all (the router never picked them). Their weights are
still quantized: a method that needs the expert's inputs (gptq, autoround) falls back to minmax rounding, with a
log line per expert and a count per MoE layer. Static activations on experts are refused before any work
(app/quantize.py), since no serving kernel runs them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.lowrank import LowRankResidualLinear
from msmodelslim.ir.flat_transform import flat_transform
from msmodelslim.ir.online_rotation import input_rotation
from msmodelslim.ir.non_fusion_smooth import pattern_name
from msmodelslim.ir.quant_linear import QuantLinear, run_time_input_quantizer
from msmodelslim.model.moe import routed_expert_linears
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.matching import select
from msmodelslim.processor.sampling import RowSample
from msmodelslim.quantizer.dualscale import effective_dual_block, quantize_weight_dualscale
from msmodelslim.quantizer.gptaq import accumulate_asymmetry, asymmetric_target
from msmodelslim.quantizer.gptq import accumulate_hessian
from msmodelslim.quantizer.nvfp4 import global_scale
from msmodelslim.quantizer.observer import HistogramObserver, MinMaxObserver
from msmodelslim.quantizer.primitives import quantize_weight_minmax
from msmodelslim.quantizer.scheme import LinearQConfig, QConfig, QDType, QScope
from msmodelslim.quantizer.weight import quantize_weight, quantize_weight_with_global

log = get_logger("linear_quant")


@dataclass
class InputRecord:
    """What one linear's calibration inputs left behind: the activation observer and/or GPTQ's Hessian (and
    GPTAQ's asymmetry term, from the float model's inputs handed over in `references`)."""

    observer: Optional[MinMaxObserver | HistogramObserver] = None
    collect_hessian: bool = False
    hessian: Optional[torch.Tensor] = None
    tokens: int = 0
    sample: Optional[RowSample] = None  # input rows, for methods that tune on them (autoround)
    collect_asymmetry: bool = False
    asymmetry: Optional[torch.Tensor] = None
    references: list = field(default_factory=list)  # the float model's inputs of the calls still to come
    # GPTAQ: the kernel's run-time input quantization, applied to X̃ (the layer is fitted to what it will read)
    input_quantizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    input_error: Optional[torch.Tensor] = None  # svd_res layers: 2·(X̃u − Q)·Qᵀ/n, their float pair reads X̃u
    keep_input_error: bool = False

    def update(self, x: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.update(x)
        if self.collect_hessian:
            x = x.detach().float()
            if self.collect_asymmetry:  # before the token count moves on
                if self.input_quantizer is not None:
                    unquantized, x = x, self.input_quantizer(x)
                    if self.keep_input_error:
                        self.input_error = accumulate_asymmetry(self.input_error, self.tokens, x, unquantized)
                reference = self.references.pop(0) if self.references else None
                if reference is not None and reference.shape != x.shape:
                    raise ProcessingError(f"GPTAQ: the float model's input {tuple(reference.shape)} and the "
                                          f"quantized model's {tuple(x.shape)} of a linear differ in shape")
                self.asymmetry = accumulate_asymmetry(self.asymmetry, self.tokens, x, reference)
            self.hessian, self.tokens = accumulate_hessian(self.hessian, self.tokens, x)
        if self.sample is not None:
            self.sample.add(x)

    def merge(self, collective, features: int) -> None:
        """dp_layer_wise: combine with the other ranks' records of the same linear (`features` inputs)."""
        if self.observer is not None:
            self.observer.merge(collective)
        if self.collect_hessian:  # means over tokens: sum n_r·M_r over ranks, divide by Σ n_r
            total = collective.sum_int(self.tokens)

            def merged(mean: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                local = mean * self.tokens if mean is not None else torch.zeros(features, features,
                                                                                 dtype=torch.float64)
                summed = collective.sum(local)
                return summed / total if total else None

            self.hessian = merged(self.hessian)
            if self.collect_asymmetry:
                self.asymmetry = merged(self.asymmetry)
            if self.keep_input_error:
                self.input_error = merged(self.input_error)
            self.tokens = total
        if self.sample is not None:
            self.sample.merge(collective, features)

    @property
    def complete(self) -> bool:
        return ((self.observer is None or self.observer.seen) and (not self.collect_hessian or self.tokens > 0)
                and (self.sample is None or not self.sample.empty))


def new_record(q: LinearQConfig) -> InputRecord:
    observer = None
    if q.calibrated_act:  # NVFP4's global input scale comes from the min/max too
        observer = HistogramObserver(q.act.symmetric) if q.act.method == "histogram" else MinMaxObserver()
    return InputRecord(observer, collect_hessian=q.weight.method == "gptq")


def quantization_source(weight: torch.Tensor, spec: QConfig) -> torch.Tensor:
    """The weight a method quantizes, in float32; except that integer min/max rounding takes a bf16/fp16 weight
    as loaded (`takes_stored_weights`): its min/max are exact in any float dtype and quantize_in_row_chunks
    widens the rows piece by piece, so the codes are those of the float32 copy, which is never made."""
    integer_minmax = spec.method == "minmax" and spec.dtype in (QDType.int8, QDType.int4)
    return weight if integer_minmax else weight.float()


def linear_to_ir(linear: nn.Linear, config: LinearQuantConfig, record: Optional[InputRecord],
                 weight: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                 group_amax: Optional[torch.Tensor] = None) -> QuantLinear:
    """Pure conversion of one float linear into its quantized representation; `weight` (codes, scale,
    offset) when a method has already quantized the weight. A linear split by svd_res holds the residual in
    `weight`: that is what is quantized, and its low-rank pair travels into the QuantLinear unchanged."""
    q = config.qconfig
    hessian = record.hessian if record is not None else None
    source = quantization_source(linear.weight.detach(), q.weight)
    if record is not None and record.asymmetry is not None and q.weight.option("gptaq_alpha") > 0:
        lowrank = (linear.svd_lowrank_l2.float() @ linear.svd_lowrank_l1.float()
                   if isinstance(linear, LowRankResidualLinear) else None)
        source = asymmetric_target(source, hessian, record.asymmetry, q.weight.option("gptaq_alpha"),
                                   q.weight.option("percdamp"), lowrank, record.input_error)
    dual = weight_global = None
    if weight is None and q.weight.dtype.value == "nvfp4":  # FP8 block scales and the global scale apart
        qweight, scale, weight_global = quantize_weight_with_global(source, q.weight, hessian, group_amax)
        offset = torch.zeros_like(scale)
    elif weight is None and q.weight.method == "dualscale":  # the E8M0 scales and the float32 dual ones apart
        qweight, scale, dual = quantize_weight_dualscale(source, q.weight.ext["dual_block_size"])
        offset = torch.zeros_like(scale)
    else:
        qweight, scale, offset = weight or quantize_weight(source, q.weight, hessian)
    input_scale = input_offset = input_global = None
    if q.act.dtype == QDType.nvfp4:  # 448·6 / max|x| over the calibration inputs (llm-compressor's static_minmax)
        input_global = global_scale(torch.maximum(record.observer.min.abs(), record.observer.max.abs()))
    elif q.static_act:
        input_scale, input_offset = record.observer.qparams(q.act.dtype.bits, q.act.symmetric)
    bias = None if linear.bias is None else linear.bias.detach().float()
    split = isinstance(linear, LowRankResidualLinear)
    lowrank = (linear.svd_lowrank_l1, linear.svd_lowrank_l2) if split else (None, None)
    return QuantLinear(q.scheme, qweight, scale, offset, bias, input_scale, input_offset, *lowrank, weight_dual_scale=dual,
                       weight_global_scale=weight_global, input_global_scale=input_global,
                       rotation=input_rotation(linear), flat=flat_transform(linear))


def minmax_fallback_ir(linear: nn.Linear, config: LinearQuantConfig) -> QuantLinear:
    """The linear quantized by round to nearest with min/max ranges, for a layer whose method lacks data."""
    w = config.qconfig.weight
    if w.dtype.element is not None:  # a float grid: round to nearest on that grid (the method's start)
        weights = w.model_copy(update={"method": "minmax", "ext": {}})
        minmax = config.model_copy(update={"qconfig": config.qconfig.model_copy(update={"weight": weights})})
        return linear_to_ir(linear, minmax, None)
    weight = quantize_weight_minmax(linear.weight.detach(), w.dtype.bits, w.symmetric, w.group_size)
    return linear_to_ir(linear, config, None, weight=weight)


def log_starved_experts(block: nn.Module, block_name: str, method: str, starved: dict[str, dict[int, list[str]]],
                        targeted: set[str]) -> None:
    """One line per expert that saw no tokens, then per MoE layer how many of its experts saw none."""
    for layer in sorted(targeted):
        for e, projections in sorted(starved.get(layer, {}).items()):
            log.info("%s.%d received no calibration tokens: %s quantized by minmax rounding instead of %s",
                     layer, e, ", ".join(projections), method)
        count, total = len(starved.get(layer, {})), len(block.get_submodule(layer[len(block_name) + 1 :]))
        (log.warning if count else log.info)("%s: %d of %d experts received no calibration tokens", layer, count, total)


def _replace(root: nn.Module, relative_name: str, new: nn.Module) -> None:
    parent_name, _, child = relative_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@register_processor("linear_quant")
class LinearQuantProcessor(Processor):
    def __init__(self, config: LinearQuantConfig, context: ProcessorContext | None = None) -> None:
        self.config = config
        self._records: dict[str, InputRecord] = {}
        self._hooks: list = []
        self._fused_groups = (context or ProcessorContext()).structure.fused_groups
        self._group_amax: dict[str, torch.Tensor] = {}  # NVFP4: the max|W| each layer's global scale comes from

    @property
    def needs_calibration(self) -> bool:
        return self.config.qconfig.needs_calibration

    @property
    def takes_stored_weights(self) -> bool:
        return not self.needs_calibration  # linear_to_ir widens what its method needs in float32

    def _targets(self, block_name: str, block: nn.Module) -> list[str]:
        # a linear wrapped by non-fusion smoothing (`<p>.linear`) is matched by the patterns as `<p>`
        names = {f"{block_name}.{pattern_name(block, n)}": f"{block_name}.{n}"
                 for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        return [names[n] for n in select(list(names), self.config.include, self.config.exclude)]

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        rule = f"linear_quant(include={self.config.include}, exclude={self.config.exclude})"
        return {n: rule for n in select(linear_names, self.config.include, self.config.exclude)}

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        if not self.needs_calibration:
            return
        paired = set(self._paired_targets(block_name, block))
        targets = self._targets(block_name, block)
        if paired and len(paired) < len(targets):
            log.info("%s: %d routed-expert linears get plain GPTQ: GPTAQ pairs each token's float and quantized "
                     "inputs, and the float model's router may send a token to other experts",
                     block_name, len(targets) - len(paired))
        for name in targets:
            record = self._records[name] = self.new_record()
            module = block.get_submodule(name[len(block_name) + 1 :])
            if name in paired:
                record.collect_asymmetry = True
                record.input_quantizer = self._run_time_input_quantizer(module)
                record.keep_input_error = record.input_quantizer is not None and isinstance(module, LowRankResidualLinear)
            self._hooks.append(module.register_forward_pre_hook(lambda _m, args, r=record: r.update(args[0])))

    @property
    def uses_reference(self) -> bool:
        weight = self.config.qconfig.weight
        return weight.method == "gptq" and weight.option("gptaq_alpha") > 0

    def _paired_targets(self, block_name: str, block: nn.Module) -> list[str]:
        """GPTAQ's targets: all but routed experts, whose router picks other tokens in the float model."""
        if not self.uses_reference:
            return []
        experts = routed_expert_linears(block, block_name)
        return [n for n in self._targets(block_name, block) if n not in experts]

    def _run_time_input_quantizer(self, linear: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The input quantization the kernel applies at run time, for GPTAQ's X̃ (None: the input stays float or
        needs a calibrated range). Behind FlatQuant (its transform is applied before this step's hooks) that is
        the clipped quantization of the transformed input."""
        q = self.config.qconfig
        dual = q.act.ext.get("dual_block_size") if q.act.method == "dualscale" else None
        dual_block = None if dual is None else effective_dual_block(linear.in_features, dual)
        return run_time_input_quantizer(q.scheme, dual_block, flat_transform(linear))

    def needs_reference(self, block_name: str, block: nn.Module) -> bool:
        return bool(self._paired_targets(block_name, block))

    @contextmanager
    def watch_reference(self, block_name: str, reference_block: nn.Module) -> Iterator[None]:
        hooks = []
        for name, record in self._records.items():
            if record.collect_asymmetry:
                module = reference_block.get_submodule(name[len(block_name) + 1 :])
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, r=record: r.references.append(args[0].detach().float())))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @property
    def range_statistics(self) -> bool:
        """Static min/max activation ranges and nothing else (no Hessian, histogram or row sample)."""
        if not self.needs_calibration:
            return False
        record = self.new_record()
        return isinstance(record.observer, MinMaxObserver) and not record.collect_hessian and record.sample is None

    def ranges_suffice(self, block_name: str, block: nn.Module, ranges) -> bool:
        """A per-tensor min/max range is the min/max over the per-channel ones, so carried ranges serve."""
        return self.range_statistics and all(ranges.seen(n[len(block_name) + 1 :])
                                             for n in self._targets(block_name, block))

    def calibrate_from_ranges(self, block_name: str, block: nn.Module, ranges) -> None:
        for name in self._targets(block_name, block):
            record = self._records[name] = self.new_record()
            record.observer.update_range(*ranges[name[len(block_name) + 1 :]].tensor_range())

    def data_parallel_refusal(self) -> Optional[str]:
        if self.config.qconfig.static_act and self.config.qconfig.act.method == "histogram":
            return ("act.method histogram re-bins its histogram batch by batch, so ranks cannot merge it; "
                    "use act.method minmax")
        return None

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for name in sorted(self._records):  # the same order on every rank
            features = block.get_submodule(name[len(block_name) + 1 :]).in_features
            self._records[name].merge(collective, features)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        experts = routed_expert_linears(block, block_name)
        targeted: set[str] = set()  # MoE layers whose experts this rule quantizes
        starved: dict[str, dict[int, list[str]]] = {}  # MoE layer -> expert -> projections that saw no tokens
        self._group_amax = self._fused_amax(block_name, block)
        for name in self._targets(block_name, block):
            relative = name[len(block_name) + 1 :]
            linear = block.get_submodule(relative)
            group = self.config.qconfig.weight.group_size
            if self.config.qconfig.weight.scope == QScope.per_group and linear.in_features % group:
                raise ProcessingError(
                    f"{name}: group_size {group} does not divide its input size {linear.in_features}; "
                    f"pick a group size that divides it or exclude the layer"
                )
            record = self._records.pop(name, None)
            if name in experts:
                targeted.add(experts[name][0])
            if self.needs_calibration and (record is None or not record.complete):
                if name not in experts or self.config.qconfig.calibrated_act:
                    raise ProcessingError(f"{name} received no calibration data, so its static activation range "
                                          f"(or GPTQ Hessian) is unknown")
                layer, e = experts[name]
                starved.setdefault(layer, {}).setdefault(e, []).append(relative.rsplit(".", 1)[-1])
                with torch.no_grad():
                    _replace(block, relative, minmax_fallback_ir(linear, self.config))
                continue
            with torch.no_grad():
                _replace(block, relative, self.to_ir(name, linear, record))
        if self.needs_calibration:
            log_starved_experts(block, block_name, self.method_name, starved, targeted)

    def _fused_amax(self, block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """NVFP4 only: per target, the largest max|W| of its fused group (q/k/v, gate/up: the adapter's
        fused_groups, among this rule's targets), since the engine keeps one global scale per fused layer."""
        if self.config.qconfig.weight.dtype != QDType.nvfp4:
            return {}
        targets = self._targets(block_name, block)
        amax = {n: block.get_submodule(n[len(block_name) + 1 :]).weight.detach().abs().max().float() for n in targets}
        shared = dict(amax)
        for group in self._fused_groups:
            members: dict[str, list[str]] = {}
            for name in targets:
                parent, _, leaf = name.rpartition(".")
                if leaf in group:
                    members.setdefault(parent, []).append(name)
            for names in members.values():
                top = torch.stack([amax[n] for n in names]).max()
                shared.update({n: top for n in names})
        return shared

    @property
    def method_name(self) -> str:
        """The weight method, as log lines name it."""
        return self.config.qconfig.weight.method

    def new_record(self) -> InputRecord:
        return new_record(self.config.qconfig)

    def to_ir(self, name: str, linear: nn.Linear, record: Optional[InputRecord]) -> QuantLinear:
        return linear_to_ir(linear, self.config, record, group_amax=self._group_amax.get(name))
