"""`linear_quant`: round-to-nearest quantization of linear layers.

Weights: min/max per output channel or per group (`quantizer.primitives.quantize_weight_minmax`).
Static activations (W8A8): min/max of the layer's input over the calibration data, one scale and offset per
tensor. Dynamic activations (per_token) need no data: the kernel measures each token at run time.
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.matching import select
from msmodelslim.quantizer.observer import MinMaxObserver
from msmodelslim.quantizer.primitives import quantize_weight_minmax, scale_offset_from_minmax
from msmodelslim.quantizer.scheme import QScope


def linear_to_ir(linear: nn.Linear, config: LinearQuantConfig, observer: MinMaxObserver | None) -> QuantLinear:
    """Pure conversion of one float linear into its quantized representation."""
    q = config.qconfig
    qweight, scale, offset = quantize_weight_minmax(
        linear.weight.detach(), q.weight.dtype.bits, q.weight.symmetric, q.weight.group_size
    )
    input_scale = input_offset = None
    if q.needs_calibration:
        input_scale, input_offset = scale_offset_from_minmax(observer.min, observer.max, q.act.dtype.bits, q.act.symmetric)
    bias = None if linear.bias is None else linear.bias.detach()
    return QuantLinear(q.scheme, qweight, scale, offset, bias, input_scale, input_offset)


def _replace(root: nn.Module, relative_name: str, new: nn.Module) -> None:
    parent_name, _, child = relative_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@register_processor("linear_quant")
class LinearQuantProcessor(Processor):
    def __init__(self, config: LinearQuantConfig, context: ProcessorContext | None = None) -> None:
        self.config = config
        self._observers: dict[str, MinMaxObserver] = {}
        self._hooks: list = []

    @property
    def needs_calibration(self) -> bool:
        return self.config.qconfig.needs_calibration

    def _targets(self, block_name: str, block: nn.Module) -> list[str]:
        names = [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        return select(names, self.config.include, self.config.exclude)

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        rule = f"linear_quant(include={self.config.include}, exclude={self.config.exclude})"
        return {n: rule for n in select(linear_names, self.config.include, self.config.exclude)}

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        if not self.needs_calibration:
            return
        for name in self._targets(block_name, block):
            observer = self._observers[name] = MinMaxObserver()
            module = block.get_submodule(name[len(block_name) + 1 :])
            self._hooks.append(module.register_forward_pre_hook(lambda _m, args, obs=observer: obs.update(args[0])))

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name in self._targets(block_name, block):
            relative = name[len(block_name) + 1 :]
            linear = block.get_submodule(relative)
            group = self.config.qconfig.weight.group_size
            if self.config.qconfig.weight.scope == QScope.per_group and linear.in_features % group:
                raise ProcessingError(
                    f"{name}: group_size {group} does not divide its input size {linear.in_features}; "
                    f"pick a group size that divides it or exclude the layer"
                )
            observer = self._observers.pop(name, None)
            if self.needs_calibration and (observer is None or not observer.seen):
                raise ProcessingError(f"{name} received no calibration data, so its static activation range is unknown")
            with torch.no_grad():
                _replace(block, relative, linear_to_ir(linear, self.config, observer))
