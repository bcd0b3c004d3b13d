"""`KVCacheQuant`: an attention's int8 KV cache (C8) held as per-channel scales and offsets, whose forward maps the
K and V written into the cache to what attention reads back from it (quantizer/kv_cache.py), in float.

Like `QuantLinear` for linears, it is the one representation between the algorithm (`dynamic_cache` produces
it), the writers (ascendv1 stores it as `<attn>.k_proj.kv_cache_scale`, ...) and the reader (which rebuilds
it). Tensors: `key_scale`, `key_offset`, `value_scale`, `value_offset`, fp32 [kv_heads·head_dim].
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.quantizer.kv_cache import fake_quantize_cache, fake_quantize_cache_fp8


class KVCacheQuant(nn.Module):
    def __init__(self, key_scale: torch.Tensor, key_offset: torch.Tensor, value_scale: torch.Tensor,
                 value_offset: torch.Tensor) -> None:
        super().__init__()
        shapes = {tuple(t.shape) for t in (key_scale, key_offset, value_scale, value_offset)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"KV-cache scales and offsets must be four 1-D tensors of one size, got {sorted(shapes)}")
        self.register_buffer("key_scale", key_scale.float())
        self.register_buffer("key_offset", key_offset.float())
        self.register_buffer("value_scale", value_scale.float())
        self.register_buffer("value_offset", value_offset.float())

    @property
    def channels(self) -> int:
        return self.key_scale.shape[0]

    def forward(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("K", key_states), ("V", value_states)):
            if x.shape[1] * x.shape[3] != self.channels:
                raise ValueError(f"{name} cache tensor {list(x.shape)} has {x.shape[1] * x.shape[3]} channels, "
                                 f"the C8 scales {self.channels}")
        return (fake_quantize_cache(key_states, self.key_scale, self.key_offset),
                fake_quantize_cache(value_states, self.value_scale, self.value_offset))

    def extra_repr(self) -> str:
        return f"C8 int8 per channel, channels={self.channels}"


class FP8KVCacheQuant(nn.Module):
    """An attention's FP8 E4M3 KV cache with one static scale per tensor: vLLM's KV cache as compressed-tensors
    describes it (`kv_cache_scheme` fp8 per tensor; the compressed-tensors writer stores `<attn>.k_scale` and
    `<attn>.v_scale`). Tensors: `key_scale`, `value_scale`, fp32 [1]."""

    def __init__(self, key_scale: torch.Tensor, value_scale: torch.Tensor) -> None:
        super().__init__()
        if key_scale.numel() != 1 or value_scale.numel() != 1:
            raise ValueError(f"FP8 KV-cache scales are per tensor (one element each), got {list(key_scale.shape)} "
                             f"and {list(value_scale.shape)}")
        self.register_buffer("key_scale", key_scale.float().reshape(1))
        self.register_buffer("value_scale", value_scale.float().reshape(1))

    def forward(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fake_quantize_cache_fp8(key_states, self.key_scale), fake_quantize_cache_fp8(value_states,
                                                                                             self.value_scale)

    def extra_repr(self) -> str:
        return "FP8 E4M3 per tensor"
