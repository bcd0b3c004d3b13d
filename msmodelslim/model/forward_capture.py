"""Where a model's own forward meets its first block: `forward_until` runs the model (any family, its own
embeddings, masks and position encodings) until that block would start and returns its arguments; `to_device`
moves such arguments, nested in tuples, lists and dicts, to a device."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


class _StopBeforeFirstBlock(Exception):
    """Raised from a hook to end a model forward once the first block's inputs are known."""


def forward_until(model: nn.Module, first: nn.Module, call: dict[str, Any],
                  substitutes: Optional[dict[nn.Module, Callable[..., Any]]] = None,
                  observe: Optional[dict[str, nn.Module]] = None) -> tuple[tuple, dict, dict[str, dict]]:
    """Run the model's own forward on `call` (use_cache off, no grad) until `first` would start: its args and kwargs,
    exactly as the model computes them (embeddings, masks, position encodings, any family). `substitutes`: modules
    whose forward is replaced for this call only (e.g. an embedding table already dropped, a vision tower already
    run and quantized); `observe`: {label: module} whose call kwargs are recorded, returned by label."""
    captured: dict[str, Any] = {}
    observed: dict[str, dict] = {}

    def stop(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopBeforeFirstBlock

    def recorder(label: str):
        def hook(_module, _args, kwargs):
            observed[label] = kwargs
        return hook

    handles = [m.register_forward_pre_hook(recorder(label), with_kwargs=True) for label, m in (observe or {}).items()]
    handles.append(first.register_forward_pre_hook(stop, with_kwargs=True))
    for module, forward in (substitutes or {}).items():
        module.forward = forward
    try:
        with torch.no_grad():
            model(**call, use_cache=False)
    except _StopBeforeFirstBlock:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for module in substitutes or {}:
            module.__dict__.pop("forward", None)  # back to the class's forward
    return captured["args"], captured["kwargs"], observed


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
