"""`kv_smooth`: flatten K's outlier channels before the KV cache by moving per-channel scales from K into Q
(the key-smoothing idea of SmoothQuant applied to attention, as in QServe's SmoothAttention), exact in float.
The maths is in smooth.py; this module observes max|K| per channel as K is written into the cache (after
RoPE, model/kv_cache.py) during the block's calibration forward, then folds the scales into the modules before
RoPE that the family names (`KvCacheStructure.query_fold`/`key_fold`: q_proj/k_proj rows, or Qwen3's
q_norm/k_norm).

    - type: kv_smooth
      smooth_factor: 1.0          # s = (max|K| per RoPE pair) ** smooth_factor
      include: ["*"]              # attention modules
      exclude: []

What it buys: a K quantizer coarser than one scale per channel (one per head, as FA3's int8 K, or per tensor)
sees flattened channels. The C8 cache has one scale per channel already, and a per-channel scale of K moves
its per-channel quantization grid with it: C8's error is unchanged by kv_smooth (up to float rounding).
dp_layer_wise: the ranks all-reduce max|K|, so the scales equal a single process's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.model.kv_cache import tap_cache_writes
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.kv_attention import check_attentions, kv_cache_structure, selected_attentions
from msmodelslim.processor.kv_smooth import smooth
from msmodelslim.processor.kv_smooth.config import KVSmoothConfig
from msmodelslim.quantizer.kv_cache import CacheChannelRange

log = get_logger("kv_smooth")


def _key_recorder(key_range: CacheChannelRange):
    def record(key_states: torch.Tensor, value_states: torch.Tensor):
        key_range.update(key_states)
        return key_states, value_states

    return record


@register_processor("kv_smooth")
class KVSmoothProcessor(Processor):
    def __init__(self, config: KVSmoothConfig, context: ProcessorContext = ProcessorContext()) -> None:
        self.config = config
        self.structure = kv_cache_structure("kv_smooth", context)
        self.decoder_layer = context.structure.is_decoder_layer  # a VLM's vision tower has no KV cache
        shape = context.attention
        if shape is None:
            raise UnsupportedError(f"kv_smooth: adapter {context.adapter_name} gives no attention shape (heads, "
                                   f"head_dim), so K's channels cannot be matched to Q's")
        if shape.head_dim % 2:
            raise UnsupportedError(f"kv_smooth: head_dim {shape.head_dim} is odd, so it has no RoPE pairs")
        self.shape = shape
        self._ranges: dict[str, CacheChannelRange] = {}
        self._hooks: list = []

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # a float transform: it decides no layer's scheme

    def _folds(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        return attention.get_submodule(self.structure.query_fold), attention.get_submodule(self.structure.key_fold)

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: the fold points exist, have weights, and are sized per head (projection rows) or
        shared by every head (a norm over head_dim)."""
        block_names = [b for b in block_names if self.decoder_layer(b)]
        for name, attention in check_attentions("kv_smooth", self.structure, model, block_names,
                                                self.config.include, self.config.exclude):
            for fold, heads in ((self.structure.query_fold, self.shape.num_heads),
                                (self.structure.key_fold, self.shape.num_kv_heads)):
                try:
                    module = attention.get_submodule(fold)
                except AttributeError:
                    raise UnsupportedError(f"kv_smooth: {name} has no module {fold!r} (KvCacheStructure)") from None
                weight = getattr(module, "weight", None)
                # a projection: one row per head channel; anything else (a norm over head_dim): shared by heads
                rows = heads * self.shape.head_dim if isinstance(module, nn.Linear) else self.shape.head_dim
                if not isinstance(weight, torch.Tensor) or list(weight.shape[:1]) != [rows]:
                    raise UnsupportedError(
                        f"kv_smooth: {name}.{fold} must be a projection with {heads * self.shape.head_dim} output "
                        f"rows or a per-head norm of {self.shape.head_dim}; it is {type(module).__name__} "
                        f"{list(weight.shape) if isinstance(weight, torch.Tensor) else 'without a weight'}")

    def _attentions(self, block_name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
        if not self.decoder_layer(block_name):
            return []
        return selected_attentions(self.structure, block_name, block, self.config.include, self.config.exclude)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for name, attention in self._attentions(block_name, block):
            key_range = self._ranges[name] = CacheChannelRange()
            self._hooks.append(tap_cache_writes(attention, _key_recorder(key_range)))

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # max|K| merges exactly

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        channels = self.shape.num_kv_heads * self.shape.head_dim
        for name in sorted(self._ranges):
            self._ranges[name].merge(collective, channels)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, attention in self._attentions(block_name, block):
            key_range = self._ranges.pop(name)
            if not key_range.seen:
                raise ProcessingError(f"{name} wrote nothing into its KV cache during the calibration forward, so "
                                      f"kv_smooth has no K statistics")
            self._fold(name, attention, key_range.absmax)

    def _fold(self, name: str, attention: nn.Module, key_absmax: torch.Tensor) -> None:
        query, key = self._folds(attention)
        for fold, module in ((self.structure.query_fold, query), (self.structure.key_fold, key)):
            if isinstance(module, QuantLinear):
                raise ProcessingError(f"kv_smooth: {name}.{fold} is already quantized; put kv_smooth before the "
                                      f"linear_quant step that quantizes it")
        shape = self.shape
        maxima = smooth.pair_maxima(key_absmax, shape.num_kv_heads, shape.head_dim)
        key_shared, query_shared = not isinstance(key, nn.Linear), not isinstance(query, nn.Linear)
        if key_shared or query_shared:  # a per-head norm holds one weight for every head: one scale for all
            maxima = maxima.amax(dim=0, keepdim=True)
        scales = smooth.smoothing_scales(maxima, self.config.smooth_factor).expand(shape.num_kv_heads, -1)
        smooth.scale_rows(key, 1.0 / (scales[0] if key_shared else scales.reshape(-1)))
        smooth.scale_rows(query, scales[0] if query_shared else smooth.query_rows(scales, shape.num_heads))
        log.debug("%s: K channel max %.4g -> scales in [%.4g, %.4g]", name, float(key_absmax.max()),
                  float(scales.min()), float(scales.max()))
