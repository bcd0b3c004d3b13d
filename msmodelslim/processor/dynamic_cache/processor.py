"""`dynamic_cache` (C8): an int8 KV cache, one scale per channel, calibrated with min/max while the cache is
written (the KV-cache quantization of vLLM-Ascend, formats.md A.6; KIVI and KVQuant study the same per-channel
K statistics).

During the block's calibration forward a tap on each selected attention's cache argument (model/kv_cache.py)
records the range of every channel c = kv_head·head_dim + d of K (after RoPE, as cached) and of V. Then

    s_c = max(|min_c|, |max_c|) / 127,   offset_c = 0

becomes the attention's `KVCacheQuant` (ir/kv_cache.py), installed so that the block's later forwards read the
cache as the engine does (quantized on write, dequantized with the scale alone on read). dp_layer_wise:
the ranks all-reduce min and max, so every rank, and the output, equal a single process's.

    - type: dynamic_cache
      qconfig: {dtype: int8, scope: per_channel, symmetric: true, method: minmax}
      include: []          # attention modules; empty = all
      exclude: ["model.layers.0.self_attn"]

No cache is built: the tap receives K/V even with use_cache off, so calibration memory does not grow.

qconfig {dtype: fp8_e4m3, scope: per_tensor} is vLLM's FP8 KV cache instead (what a compressed-tensors
`kv_cache_scheme` describes; only compressed_tensors saves it): from the same ranges, one scale per tensor,
s = max_c max(|min_c|, |max_c|) / 448 (ir.kv_cache.FP8KVCacheQuant).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ConfigError, ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.kv_cache import FP8KVCacheQuant, KVCacheQuant
from msmodelslim.model.kv_cache import KV_CACHE_QUANT, install_kv_cache_quant, tap_cache_writes
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.dynamic_cache.config import DynamicCacheConfig
from msmodelslim.processor.kv_attention import check_attentions, kv_cache_structure, selected_attentions
from msmodelslim.quantizer.kv_cache import CacheChannelRange, fp8_tensor_scale
from msmodelslim.quantizer.scheme import QDType

log = get_logger("dynamic_cache")


def _recorder(key_range: CacheChannelRange, value_range: CacheChannelRange):
    def record(key_states: torch.Tensor, value_states: torch.Tensor):
        key_range.update(key_states)
        value_range.update(value_states)
        return key_states, value_states  # observed, not changed

    return record


@register_processor("dynamic_cache")
class DynamicCacheProcessor(Processor):
    def __init__(self, config: DynamicCacheConfig, context: ProcessorContext = ProcessorContext()) -> None:
        self.config = config
        self.structure = kv_cache_structure("dynamic_cache", context)
        self.decoder_layer = context.structure.is_decoder_layer  # a VLM's vision tower has no KV cache
        if context.attention is None:
            raise UnsupportedError(f"dynamic_cache: adapter {context.adapter_name} gives no attention shape "
                                   f"(heads, head_dim), so the cache channels are unknown")
        self.channels = context.attention.num_kv_heads * context.attention.head_dim
        self._ranges: dict[str, tuple[CacheChannelRange, CacheChannelRange]] = {}
        self._hooks: list = []

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # the cache is not a linear: no layer's scheme is decided here

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        block_names = [b for b in block_names if self.decoder_layer(b)]
        check_attentions("dynamic_cache", self.structure, model, block_names, self.config.include,
                         self.config.exclude)

    def _attentions(self, block_name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
        if not self.decoder_layer(block_name):
            return []
        return selected_attentions(self.structure, block_name, block, self.config.include, self.config.exclude)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for name, attention in self._attentions(block_name, block):
            if hasattr(attention, KV_CACHE_QUANT):
                raise ConfigError(f"{name}: its KV cache is already quantized by an earlier dynamic_cache step; "
                                  f"select each attention in one dynamic_cache step only")
            ranges = self._ranges[name] = (CacheChannelRange(), CacheChannelRange())
            self._hooks.append(tap_cache_writes(attention, _recorder(*ranges)))

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # min/max merge exactly

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for name in sorted(self._ranges):  # the same order on every rank
            for channel_range in self._ranges[name]:
                channel_range.merge(collective, self.channels)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, attention in self._attentions(block_name, block):
            key_range, value_range = self._ranges.pop(name)
            if not key_range.seen:
                raise ProcessingError(f"{name} wrote nothing into its KV cache during the calibration forward, so "
                                      f"its C8 scales are unknown")
            if self.config.qconfig.dtype == QDType.fp8_e4m3:
                quant = FP8KVCacheQuant(fp8_tensor_scale(key_range), fp8_tensor_scale(value_range))
            else:
                quant = KVCacheQuant(*key_range.qparams(), *value_range.qparams())
            install_kv_cache_quant(attention, quant)
            log.debug("%s: %s K scale max %.4g, V scale max %.4g", name, quant.extra_repr(),
                      float(quant.key_scale.max()), float(quant.value_scale.max()))
