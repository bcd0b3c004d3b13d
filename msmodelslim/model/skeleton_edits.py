"""Edits that make a transformers skeleton look like its family's checkpoint and serving engine, applied by an
adapter's `prepare_skeleton` before any weight is read.

- `rename_child`: transformers sometimes names a module differently from the checkpoint on disk (MiniMax-M2's
  `block_sparse_moe` is `mlp` in transformers). Module names are what the plan, the include/exclude patterns of
  a recipe, the loader and the output all use, so the module is moved to its on-disk name; the old attribute
  keeps working for the model's own forward. `move_buffer` does the same for a buffer kept under another
  module on disk; `relocate` moves a child, parameter or buffer anywhere (DeepSeek-V4's native layout).
- `keep_float`: some linears are built by the serving engine without a quantization method (vLLM's
  `quant_config=None`: routers, gates), so a quantized tensor written for them would be loaded as if it were a
  float weight. They become `EngineFloatLinear`, which is not an `nn.Linear`: no rule can plan them, and they are
  written as FLOAT, under the same tensor names.
"""
from __future__ import annotations

import weakref
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Iterable

import torch
from torch import nn


def has_module(root: nn.Module, name: str) -> bool:
    """Whether `root` has a submodule at dotted `name` (what the edits below, the readers and the smoothing
    subgraphs ask before touching one)."""
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


@lru_cache(maxsize=None)
def _aliased(cls: type, old: str, new: str) -> type:
    """`cls` with attribute `old` reading the child registered as `new` (one class per (cls, old, new))."""
    return type(cls.__name__, (cls,), {old: property(lambda self: getattr(self, new)), "__module__": cls.__module__})


def rename_child(parent: nn.Module, old: str, new: str) -> None:
    """Register `parent`'s child `old` under `new` (state-dict names follow); `parent.<old>` still returns it, so
    the family's forward code runs unchanged."""
    child = parent._modules.pop(old)
    parent.add_module(new, child)
    parent.__class__ = _aliased(type(parent), old, new)


@lru_cache(maxsize=None)
def _buffer_alias(cls: type, name: str) -> type:
    """`cls` whose attribute `name` reads a buffer moved to another module (see `move_buffer`)."""

    def read(self):
        owner, owner_name = self._moved_buffers[name]
        return getattr(owner(), owner_name)

    return type(cls.__name__, (cls,), {name: property(read), "__module__": cls.__module__})


def move_buffer(module: nn.Module, name: str, owner: nn.Module, owner_name: str) -> None:
    """Register `module`'s buffer `name` on `owner` as `owner_name` (where the checkpoint keeps it, e.g. Step-3.5's
    router bias `moe.router_bias` next to the router `moe.gate`); `module.<name>` keeps reading it."""
    tensor = module._buffers.pop(name)
    persistent = name not in module._non_persistent_buffers_set
    module._non_persistent_buffers_set.discard(name)
    owner.register_buffer(owner_name, tensor, persistent=persistent)
    moved = dict(getattr(module, "_moved_buffers", {}))
    moved[name] = (weakref.ref(owner), owner_name)  # a weak reference: no module cycle
    module._moved_buffers = moved
    module.__class__ = _buffer_alias(type(module), name)


@lru_cache(maxsize=None)
def _relocated_alias(cls: type, name: str) -> type:
    """`cls` whose attribute `name` reads what `relocate` moved to another place."""

    def read(self):
        owner, owner_name = self._relocated[name]
        return getattr(owner(), owner_name)

    return type(cls.__name__, (cls,), {name: property(read), "__module__": cls.__module__})


def relocate(module: nn.Module, name: str, owner: nn.Module, owner_name: str) -> None:
    """Register `module`'s child, parameter or buffer `name` on `owner` as `owner_name` (`owner` may be `module`
    itself, or another module anywhere in the model: DeepSeek-V4's checkpoint keeps the hyper-connection weights
    of a layer's `attn_hc` as `hc_attn_fn` on the layer, and its indexer beside the compressor, not inside it).
    State-dict names follow; `module.<name>` keeps reading it, so the family's forward code runs unchanged."""
    if name in module._modules:
        owner.add_module(owner_name, module._modules.pop(name))
    elif name in module._parameters:
        owner.register_parameter(owner_name, module._parameters.pop(name))
    elif name in module._buffers:
        persistent = name not in module._non_persistent_buffers_set
        module._non_persistent_buffers_set.discard(name)
        owner.register_buffer(owner_name, module._buffers.pop(name), persistent=persistent)
    else:
        raise AttributeError(f"{type(module).__name__} has no child, parameter or buffer {name!r}")
    relocated = dict(getattr(module, "_relocated", {}))
    relocated[name] = (weakref.ref(owner), owner_name)  # a weak reference: no module cycle
    module._relocated = relocated
    module.__class__ = _relocated_alias(type(module), name)


class EngineFloatLinear(nn.Module):
    """y = x·Wᵀ (+ b) for a linear the serving engine always runs in float: same tensors (`weight`, `bias`)
    and computation as the nn.Linear it replaces, but not an nn.Linear, so it is never planned for quantization."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def keep_float(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Replace every nn.Linear whose full name matches one of `patterns` (fnmatch) by an EngineFloatLinear;
    returns the names replaced."""
    patterns = tuple(patterns)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatchcase(n, p) for p in patterns)]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, EngineFloatLinear(linear))
    return [n for n, _ in found]


def normalized_hadamard(n: int) -> torch.Tensor:
    """H/√n for n a power of two (Sylvester: H_2m = [[H, H], [H, -H]]), float32: an orthogonal matrix."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).float()


def renamed_prefix(name: str, renames: dict[str, str]) -> str:
    """`name` with the first of `renames`' prefixes it starts with replaced ({published prefix: loaded prefix})."""
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name
