"""The model a written checkpoint is read back into, built by its family's adapter.

A family adapter reshapes the transformers model before loading (experts split per expert under the on-disk
projection names, modules renamed to the checkpoint's names, linears the engine runs in float, extra buffers
such as the DeepSeek-V3.2 indexer's rotations) and may read config.json itself (Kimi-K2). A reader of the output
must build that same model, or the tensor names would not meet their modules: it asks the adapter registered for
config.json's model_type for its skeleton.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from torch import nn

from msmodelslim.model.checkpoint import read_json


def family_adapter(path: Path, trust_remote_code: bool):
    """The adapter registered for `path`'s config.json model_type (the first name of that family in adapters.ini),
    built on `path` without opening it as a quantization source, or None when no registered adapter serves it."""
    from msmodelslim.model.registry import adapter_class, hf_families

    model_type = read_json(Path(path) / "config.json").get("model_type")
    names = hf_families().get(model_type) if isinstance(model_type, str) else None
    if not names:
        return None
    return adapter_class(names[0])(names[0], path, trust_remote_code)


class Rebuilt(NamedTuple):
    """The model a written checkpoint is read back into."""
    config: Any
    model: nn.Module  # on the meta device
    loaded_name: Callable[[str], str]  # module name -> the name transformers loads (compressed-tensors targets use it)


def family_skeleton(path: Path, trust_remote_code: bool) -> Optional[Rebuilt]:
    """The family adapter's skeleton, or None when no registered adapter serves `path`'s model_type or the adapter
    builds no skeleton of its own."""
    adapter = family_adapter(path, trust_remote_code)
    if adapter is None or not hasattr(adapter, "init_skeleton"):
        return None
    return Rebuilt(adapter.config, adapter.init_skeleton(), loaded_names_of(adapter))


def loader_module_names(path: Path, trust_remote_code: bool) -> Callable[[str], str]:
    """`loaded_names_of` the adapter for `path`, without building a skeleton; the identity also when the family's
    adapter cannot be built on `path` (what reads the model then says why)."""
    from msmodelslim.core.errors import MsModelSlimError

    try:
        adapter = family_adapter(path, trust_remote_code)
    except MsModelSlimError:
        return same_name
    return loaded_names_of(adapter)


def loaded_names_of(adapter) -> Callable[[str], str]:
    """Skeleton module name -> the module name transformers gives that layer on load, which compressed-tensors
    targets name (a family whose published names transformers renames: several VLMs); the identity otherwise."""
    rename = getattr(adapter, "loader_module_name", None)
    return rename if callable(rename) else same_name


def same_name(name: str) -> str:
    return name
