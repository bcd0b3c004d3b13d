"""Where FA3 attention quantization sees Q, K and V (the adapter side of `fa3_quant`, protocol.md §2.4
`FA3QuantAdapterInterface`): the attention's children `fa_q`, `fa_k`, `fa_v` (placeholders: observers while
calibrating, `FA3HeadQuant` once calibrated or read back, ir/fa3.py) and a rewiring of the attention that passes
Q, K and V through them right before the attention kernel, i.e. after RoPE (and after Qwen3's q/k norms, and after
the KV cache: K and V as the kernel reads them).

The rewiring is one attention function, registered with transformers as `msmodelslim_fa3` and selected by the
attention alone (it gets its own shallow copy of the config whose `_attn_implementation` names it); it applies
the placeholders and calls the kernel the model used before (sdpa, eager, ...), so masks, sliding windows and
sparse-attention masks are the model's own.

Layouts:
- "gqa" (Llama, Qwen2, Qwen3, ...): fa_q over the query heads [batch, heads, tokens, head_dim]; fa_k, fa_v over
  the key/value heads.
- "mla" (DeepSeek-V3 and relatives: GLM-4.7-Flash, GLM-5, DeepSeek-V3.2, Kimi-K2): the engine attends in the
  absorbed latent space (vLLM-Ascend MLA decode), where the cache holds one shared "head":
      K = [c_kv ; k_rot]   (kv_lora_rank normalised latent, then the RoPE key)   [batch, 1, tokens, r + rope]
      V = c_kv                                                                     [batch, 1, tokens, r]
      Q_h = [W_UK_h^T q_nope_h ; q_rot_h]                                          [batch, heads, tokens, r + rope]
  with kv_b_proj's rows per head = [W_UK_h (qk_nope_head_dim rows); W_UV_h (v_head_dim rows)]. Then
  q_h·k = q_nope_h·(W_UK_h c) + q_rot_h·k_rot (the same scores in float), out_h = W_UV_h (P_h V). fa_q has one
  scale per query head, fa_k and fa_v one each (formats.md A.6: fa_k/fa_v [num_kv_heads = 1, 1]). The latent
  K/V are taken where the attention writes its cache (a tap on its cache argument, as C8's), Q from the kernel's
  query argument; the kernel then runs on the quantized latent tensors and the output goes through W_UV.
  W_UK/W_UV are kv_b_proj's (dequantized) weights, as the engine absorbs them.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Literal, Optional

import torch
from torch import nn

from msmodelslim.ir.fa3 import BRANCHES
from msmodelslim.model.kv_cache import CACHE_ARGUMENTS, cache_argument

Layout = Literal["gqa", "mla"]
FA3_ATTENTION = "msmodelslim_fa3"
_INNER = "_fa3_inner_attention"  # the attention implementation the model used before the rewiring
_LAYOUT = "_fa3_layout"
_LATENT = "_fa3_latent"  # MLA: (c_kv, k_rot) of the current forward, as written into (and read from) the cache


def mla_layout(attention: nn.Module) -> bool:
    """Whether the attention is DeepSeek-style multi-head latent attention (the attributes the rewiring reads)."""
    return all(hasattr(attention, a) for a in ("kv_b_proj", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"))


def _eager_of(module: nn.Module):
    """The family's own eager attention (transformers defines one per modeling file)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is not None:
        return own
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def _float_weight(linear: nn.Module) -> torch.Tensor:
    dequantized = getattr(linear, "dequantized_weight", None)
    return (dequantized() if callable(dequantized) else linear.weight).float()


class _AllHeads:
    """The attention as the kernel sees it for the latent tensors: K/V already expanded to every query head."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self.num_key_value_groups = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _absorbed(module: nn.Module, inner, query: torch.Tensor, attention_mask, **kwargs):
    latent = module.__dict__.pop(_LATENT, None)
    if latent is None:
        raise RuntimeError(f"{type(module).__name__}: FA3 (MLA) found no latent K/V; the attention's forward did not "
                           f"write its cache through the FA3 tap")
    c_kv, k_rot = latent
    heads, nope, rank = query.shape[1], module.qk_nope_head_dim, module.kv_lora_rank
    weight = _float_weight(module.kv_b_proj).view(heads, nope + module.v_head_dim, rank)
    w_uk, w_uv = weight[:, :nope], weight[:, nope:]
    q_latent = torch.einsum("bhtn,hnr->bhtr", query[..., :nope].float(), w_uk)
    q = module.fa_q(torch.cat([q_latent, query[..., nope:].float()], dim=-1))
    k = module.fa_k(torch.cat([c_kv, k_rot], dim=-1).float())
    v = module.fa_v(c_kv.float())
    k, v = k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1)
    out, weights = inner(_AllHeads(module), q, k, v, attention_mask, **kwargs)  # [batch, tokens, heads, r]
    out = torch.einsum("bthr,hvr->bthv", out.float(), w_uv).to(query.dtype)
    return out, weights


def fa3_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                  **kwargs):
    """The `msmodelslim_fa3` attention implementation: Q, K, V through the attention's fa_q/fa_k/fa_v, then the
    model's own kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS.get_interface(getattr(module, _INNER), _eager_of(module))
    if getattr(module, _LAYOUT) == "mla":
        return _absorbed(module, inner, query, attention_mask, **kwargs)
    return inner(module, module.fa_q(query), module.fa_k(key), module.fa_v(value), attention_mask, **kwargs)


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FA3_ATTENTION, fa3_attention)


class LatentCacheTap:
    """MLA: stands in for the attention's cache and keeps what the cache returns (the latent c_kv and k_rot of every
    token attended to) for the FA3 attention function; anything else goes to the real cache (None without one)."""

    def __init__(self, attention: nn.Module, inner: Any = None) -> None:
        self.attention = attention
        self.inner = inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        self.attention.__dict__[_LATENT] = (key_states, value_states)
        return key_states, value_states

    def update_indexer(self, key: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The sparse-attention indexer's key cache (DeepSeek-V3.2, GLM-5): passed through without a cache."""
        if self.inner is None:
            return key
        return self.inner.update_indexer(key, layer_idx, *args, **kwargs)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"the attention asked its cache for {name!r}; a forward without a cache has none")
        return getattr(inner, name)


def _tap_latent(attention: nn.Module) -> None:
    name = cache_argument(attention)
    if name is None:
        raise ValueError(f"{type(attention).__name__}.forward takes no cache argument ({', '.join(CACHE_ARGUMENTS)}), "
                         f"so MLA's latent K/V cannot be observed")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        inner = None
        for alias in CACHE_ARGUMENTS:
            value = kwargs.pop(alias, None)
            inner = value if inner is None else inner
        kwargs[name] = LatentCacheTap(module, inner)  # the module called (a deep copy has its own hooks)
        return args, kwargs

    attention.register_forward_pre_hook(hook, with_kwargs=True)


def install_fa3(attention: nn.Module, layout: Layout, branches: dict[str, nn.Module]) -> None:
    """Make `branches` ({fa_q, fa_k, fa_v: module}) the attention's FA3 placeholders, rewiring it on the first call
    (later calls only swap the placeholders, e.g. observers for the calibrated FA3HeadQuant)."""
    if set(branches) != set(BRANCHES):
        raise ValueError(f"FA3 needs the branches {', '.join(BRANCHES)}, got {', '.join(sorted(branches))}")
    bias = getattr(attention.kv_b_proj, "bias", None) if layout == "mla" else None
    if isinstance(bias, torch.Tensor) and not bias.is_meta and bool(bias.detach().abs().max() > 0):
        raise ValueError(f"{type(attention).__name__}.kv_b_proj has a bias, which the absorbed latent attention cannot "
                         f"move into W_UK/W_UV")
    for name, module in branches.items():
        setattr(attention, name, module)
    if getattr(attention, _LAYOUT, None) is not None:
        return
    _register()
    own = copy.copy(attention.config)  # this attention alone selects the FA3 function
    setattr(attention, _INNER, attention.config._attn_implementation)
    own._attn_implementation_internal = FA3_ATTENTION
    attention.config = own
    setattr(attention, _LAYOUT, layout)
    if layout == "mla":
        _tap_latent(attention)


def installed_layout(attention: nn.Module) -> Optional[Layout]:
    return getattr(attention, _LAYOUT, None)
