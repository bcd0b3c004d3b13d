"""Where online rotation and FA3 quantization see a DiT attention's Q, K and V (the adapter side of
`online_quarot` and `fa3_quant` for diffusion transformers; protocol.md §5.2 OnlineQuaRotInterface and
FA3QuantAdapterInterface).

A family says, as data (`DitAttentionLayout`), which modules of a DiT block are attention modules. diffusers
computes an attention in its processor (e.g. `WanAttnProcessor`: projections, q/k norms, RoPE) and hands Q, K, V
to `dispatch_attention_fn` of the processor's module, [batch, tokens, heads, head_dim]. `install_qkv_tap` puts a
`QKVTap` in front of the attention's processor; while the processor runs, the tap routes that dispatch through
the attention's optional children, in this order, right where the kernel reads Q/K/V (after the norms and RoPE):

    q_rot, k_rot        online rotations (processor/online_quarot/rotation.py): q·Rᵀ, k·Rᵀ; scores unchanged
    fa_q, fa_k, fa_v    FA3 placeholders: observers while calibrating, then FA3HeadQuant (static int8 per head,
                        ir/fa3.py) or a run-time quantizer of the dynamic branches (ir/fa3_dynamic.py)

FA3 modules read [batch, heads, tokens, head_dim] (the text models' layout), so the tap transposes around them.
An attention without these children computes what it computed before. Every diffusers attention processor that
calls `dispatch_attention_fn` from its module (Wan, FLUX, HunyuanVideo, Qwen-Image) can be tapped this way;
one that does not is refused by name.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.processor.matching import matches_any

ROTATION_SLOTS = ("q_rot", "k_rot")  # online rotation sites of an attention (the established adapters' names)
FA3_SLOTS = ("fa_q", "fa_k", "fa_v")  # the FA3 placeholders, Q, K, V (as model/fa3.py's)
DISPATCH = "dispatch_attention_fn"


@dataclass(frozen=True)
class DitAttentionLayout:
    """A DiT family's attention modules, as data: their paths relative to a block (e.g. Wan: "attn1", the
    self-attention, and "attn2", the cross-attention over the text) and the attribute holding the head count."""

    modules: tuple[str, ...]
    heads: str = "heads"
    # {module path here: the established tool's name for it} (Wan: attn1 -> self_attn, attn2 -> cross_attn): the
    # include/exclude patterns of online_quarot and fa3_quant match either name, so an upstream recipe's
    # "*self_attn*" selects the self-attentions
    upstream_names: dict[str, str] = field(default_factory=dict)

    def upstream_name(self, name: str) -> str:
        """`name` (e.g. blocks.3.attn1.q_rot) with its attention path under the established tool's name."""
        parts = name.split(".")
        return ".".join(self.upstream_names.get(part, part) for part in parts)

    def select(self, names: list[str], include: list[str], exclude: list[str]) -> list[str]:
        """The names matched by include and by no exclude, each pattern tried on both spellings of a name."""
        def hit(name: str, patterns: list[str]) -> bool:
            return matches_any(name, patterns) or matches_any(self.upstream_name(name), patterns)

        return [n for n in names if hit(n, include) and not hit(n, exclude)]

    def unused_patterns(self, names: list[str], patterns: list[str]) -> list[str]:
        return [p for p in patterns if not self.select(names, [p], [])]

    def tappable_attentions(self, model: nn.Module, block_names: list[str], step: str) -> list[tuple[str, nn.Module]]:
        """(full name, module) of every block's attention modules, each checked to exist and hand Q/K/V to the
        attention function (check_tappable); `step` names the processor in a refusal."""
        found = []
        for block_name in block_names:
            for path in self.modules:
                name = f"{block_name}.{path}"
                try:
                    attention = model.get_submodule(name)
                except AttributeError:
                    raise UnsupportedError(f"{step}: {block_name} has no attention module {path!r}") from None
                check_tappable(name, attention)
                found.append((name, attention))
        return found

    def head_dim(self, attention: nn.Module) -> int:
        """The width of one head: Q's projection width over the head count."""
        heads = getattr(attention, self.heads, None)
        width = getattr(getattr(attention, "to_q", None), "out_features", None)
        if not isinstance(heads, int) or not isinstance(width, int) or width % heads:
            raise UnsupportedError(f"{type(attention).__name__} does not give its head count ({self.heads!r}) and "
                                   f"its query projection (to_q), so its heads are unknown")
        return width // heads


def _through(module: nn.Module | None, x: torch.Tensor, heads_first: bool) -> torch.Tensor:
    if module is None:
        return x
    if not heads_first:
        return module(x)
    return module(x.transpose(1, 2)).transpose(1, 2)


def tap_qkv(attention: nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V [batch, tokens, heads, head_dim] through the attention's rotation and FA3 children."""
    query = _through(getattr(attention, "q_rot", None), query, False)
    key = _through(getattr(attention, "k_rot", None), key, False)
    return (_through(getattr(attention, "fa_q", None), query, True),
            _through(getattr(attention, "fa_k", None), key, True),
            _through(getattr(attention, "fa_v", None), value, True))


class QKVTap:
    """Stands in for a diffusers attention processor: runs it with its module's `dispatch_attention_fn` routed
    through `tap_qkv` of the attention being called (restored when the call returns).

    diffusers' legacy `Attention.forward` passes a processor only the keywords its `__call__` names (it reads
    `inspect.signature(processor.__call__)`: HunyuanVideo's and Qwen-Image's image_rotary_emb, masks): the tap's
    `__call__`, as an attribute, carries the inner processor's signature, so the same keywords reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

        def call(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        call.__signature__ = inspect.signature(inner.__call__)
        self.__call__ = call  # what inspect.signature(tap.__call__) reads; calling the tap runs QKVTap.__call__

    def __call__(self, attention: nn.Module, *args, **kwargs):
        module = sys.modules[type(self.inner).__module__]
        original = getattr(module, DISPATCH)

        def dispatch(query, key, value, *rest, **options):
            return original(*tap_qkv(attention, query, key, value), *rest, **options)

        setattr(module, DISPATCH, dispatch)
        try:
            return self.inner(attention, *args, **kwargs)
        finally:
            setattr(module, DISPATCH, original)


def check_tappable(name: str, attention: nn.Module) -> None:
    """Refuse, by name, an attention whose processor does not hand Q/K/V to `dispatch_attention_fn`."""
    processor = getattr(attention, "processor", None)
    inner = processor.inner if isinstance(processor, QKVTap) else processor
    if inner is None or not hasattr(sys.modules.get(type(inner).__module__), DISPATCH):
        raise UnsupportedError(f"{name} ({type(attention).__name__}, processor {type(inner).__name__}) does not "
                               f"call diffusers' {DISPATCH}, so its Q/K/V cannot be routed through online rotations "
                               f"or FA3 quantization")


def install_qkv_tap(attention: nn.Module) -> None:
    """Put a QKVTap in front of the attention's processor (once)."""
    if isinstance(attention.processor, QKVTap):
        return
    check_tappable(type(attention).__name__, attention)
    tap = QKVTap(attention.processor)
    if hasattr(attention, "set_processor"):
        attention.set_processor(tap)
    else:
        attention.processor = tap


def set_slot(attention: nn.Module, slot: str, module: nn.Module) -> None:
    """Make `module` the attention's rotation or FA3 child `slot`, tapping the attention if needed."""
    if slot not in ROTATION_SLOTS + FA3_SLOTS:
        raise ValueError(f"unknown attention slot {slot!r}")
    install_qkv_tap(attention)
    setattr(attention, slot, module)
