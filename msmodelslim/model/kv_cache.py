"""Where K and V enter the KV cache: the family's description (`KvCacheStructure`, data) and a tap on the
attention's cache argument (`tap_cache_writes`) through which K and V pass on their way into the cache.

Transformers' decoder attentions (Llama, Qwen2, Qwen3, Mistral, ...) compute K after RoPE (after Qwen3's
k_norm too) and hand K and V to `cache.update(key_states, value_states, layer_idx, ...)`, then attend over what
it returns. Those are the tensors a serving engine stores in its cache, and the ones vLLM-Ascend's C8 quantizes
on the way in (formats.md A.6). A forward pre-hook on the attention puts a `CacheWriteTap` in place of its cache
argument; the tap's `update` passes K and V through a function (record them; or quantize and dequantize them)
and then into the real cache, if the forward has one. No cache needs to exist: with `use_cache=False` the tap
alone receives the call, so calibration keeps no cache in memory, and a perplexity forward sees every token's
K/V as a decoding step would read them back from the cache.

Taps nest: a tap registered later wraps the one registered before it, so its function runs first.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

KV = tuple[torch.Tensor, torch.Tensor]

# The name of the attention forward's cache argument across transformers versions (5.x: `cache`).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class KvCacheStructure:
    """A family's attention, as KV-cache quantization sees it. Names are relative to a decoder block (attention)
    or to the attention (the fold points).

    attention: the module whose forward writes K [batch, kv_heads, tokens, head_dim] (after RoPE) and V into the
    cache; the ascendv1 C8 tensors are named `<attention>.k_proj.kv_cache_scale` and so on.
    query_fold / key_fold: the last modules with weights on the query and key paths before RoPE, where
    kv_smooth folds its per-channel scale: projections (`q_proj`/`k_proj`: one row per head channel, bias
    included) or per-head norms (Qwen3's `q_norm`/`k_norm`: one weight of head_dim that every head shares).
    """

    attention: str = "self_attn"
    query_fold: str = "q_proj"
    key_fold: str = "k_proj"


LLAMA_KV_CACHE = KvCacheStructure()  # Llama, Qwen2 (biases on q/k fold with the rows)
QWEN3_KV_CACHE = KvCacheStructure(query_fold="q_norm", key_fold="k_norm")  # q/k norms after the projections


class CacheWriteTap:
    """Stands in for the attention's cache: K and V pass through `transform` on their way into `inner` (the
    forward's real cache, None when it keeps none); anything else the attention asks of its cache goes to
    `inner`."""

    def __init__(self, transform: Callable[[torch.Tensor, torch.Tensor], KV], inner: Any = None) -> None:
        self.transform = transform
        self.inner = inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> KV:
        key_states, value_states = self.transform(key_states, value_states)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"the attention asked its cache for {name!r}; a forward without a cache has none")
        return getattr(inner, name)


def cache_argument(attention: nn.Module) -> Optional[str]:
    """The attention forward's cache argument, None when it takes no cache (then K/V cannot be observed)."""
    parameters = inspect.signature(attention.forward).parameters  # follows the wrappers' __wrapped__
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def tap_cache_writes(attention: nn.Module, transform: Callable[[torch.Tensor, torch.Tensor], KV]) -> RemovableHandle:
    """Route every K/V the attention writes into its cache through `transform`; remove the returned handle
    to stop. The decoder layers pass the cache by keyword, as transformers' do."""
    name = cache_argument(attention)
    if name is None:
        raise ValueError(f"{type(attention).__name__}.forward takes no cache argument ({', '.join(CACHE_ARGUMENTS)})")

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        inner = None
        for alias in CACHE_ARGUMENTS:  # a caller may still use an older name
            value = kwargs.pop(alias, None)
            inner = value if inner is None else inner
        kwargs[name] = CacheWriteTap(transform, inner)
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


KV_CACHE_QUANT = "kv_cache_quant"  # the attention's child that holds the C8 IR


def install_kv_cache_quant(attention: nn.Module, quant: nn.Module) -> RemovableHandle:
    """Make `quant` ((K, V) -> (K̂, V̂), e.g. ir.kv_cache.KVCacheQuant) the attention's cache quantization: held
    as its child `kv_cache_quant` (where the writers find it) and applied to every K/V written to the cache."""
    setattr(attention, KV_CACHE_QUANT, quant)
    return tap_cache_writes(attention, quant)
