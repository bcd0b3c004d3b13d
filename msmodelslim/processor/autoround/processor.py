"""`autoround_quant`: AutoRound (Cheng et al., 2023; quantizer/autoround.py) on the linears each strategy
selects. A strategy behaves like a linear_quant with the same qconfig whose weight rounding and clipping are
tuned on the layer's own calibration inputs (TUNE_TOKENS rows sampled evenly over the forward), against the
activation quantization the kernel applies. All strategies share one calibration forward per block.

    - type: autoround_quant
      iters: 200
      strategies:
        - qconfig: {weight: {dtype: int4, scope: per_group, method: autoround, ext: {group_size: 64}}}
          exclude: ["lm_head"]

Float weights (fp8_e4m3 per channel, mxfp8 / mxfp4 per block) are tuned on their element grid
(quantizer/autoround_float.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.logging import get_logger
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.processor.autoround.config import AutoRoundQuantConfig
from msmodelslim.processor.base import ProcessorContext, register_processor
from msmodelslim.processor.group.processor import GroupProcessor
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.linear_quant.processor import InputRecord, LinearQuantProcessor, linear_to_ir, new_record
from msmodelslim.processor.sampling import RowSample
from msmodelslim.quantizer.activation import fake_quantize_act
from msmodelslim.quantizer.autoround import AutoRoundSettings, autoround_quantize
from msmodelslim.quantizer.autoround_float import autoround_quantize_float

TUNE_TOKENS = 1024
log = get_logger("autoround_quant")


class AutoRoundLinears(LinearQuantProcessor):
    """One strategy: linear_quant whose weights come from AutoRound."""

    def __init__(self, config: LinearQuantConfig, settings: AutoRoundSettings) -> None:
        super().__init__(config)
        self.settings = settings

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def method_name(self) -> str:
        return "autoround"  # the strategy's qconfig says minmax, the start of the tuning

    def new_record(self) -> InputRecord:
        record = new_record(self.config.qconfig)
        record.sample = RowSample()
        return record

    def to_ir(self, name: str, linear: nn.Linear, record: Optional[InputRecord]) -> QuantLinear:
        q = self.config.qconfig
        x = record.sample.take(TUNE_TOKENS)
        static = record.observer.qparams(q.act.dtype.bits, q.act.symmetric) if q.static_act else None
        x_quantized = fake_quantize_act(x, q.act, static)
        if q.weight.dtype.element is not None:  # FP8 per channel, MXFP8, MXFP4: the element grid
            codes, scale, offset, loss, start = autoround_quantize_float(
                linear.weight.detach(), x, x_quantized, q.weight.dtype.value, self.settings)
        else:
            codes, scale, offset, loss, start = autoround_quantize(
                linear.weight.detach(), x, x_quantized, q.weight.dtype.bits, q.weight.symmetric,
                q.weight.group_size, self.settings)
        log.debug("%s: output MSE %.3e -> %.3e", name, start, loss)
        return linear_to_ir(linear, self.config, record, weight=(codes, scale, offset))


@register_processor("autoround_quant")
class AutoRoundQuantProcessor(GroupProcessor):
    label = "autoround_quant.strategies"

    def __init__(self, config: AutoRoundQuantConfig, context: ProcessorContext) -> None:
        self.children = []
        for strategy in config.strategies:
            settings = AutoRoundSettings(iters=config.iters, lr=config.lr,
                                         tune_rounding=config.enable_round_tuning,
                                         tune_range=config.enable_minmax_tuning,
                                         scale_dtype=getattr(torch, strategy.scale_dtype))
            linear = LinearQuantConfig(type="linear_quant", qconfig=strategy.qconfig, include=strategy.include,
                                       exclude=strategy.exclude)
            self.children.append(AutoRoundLinears(linear, settings))
