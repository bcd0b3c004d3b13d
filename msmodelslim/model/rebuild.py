"""The model a written checkpoint is read back into, built by its family's adapter.

A family adapter reshapes the transformers model before loading (experts split per expert under the on-disk
projection names, modules renamed to the checkpoint's names, linears the engine runs in float, extra buffers
such as the DeepSeek-V3.2 indexer's rotations) and may read config.json itself (Kimi-K2). A reader of the output
must build that same model, or the tensor names would not meet their modules: it asks the adapter registered for
config.json's model_type for its skeleton.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from msmodelslim.model.checkpoint import read_json


def family_skeleton(path: Path, trust_remote_code: bool) -> Optional[tuple[Any, nn.Module]]:
    """(config, meta-device skeleton) from the adapter registered for `path`'s config.json model_type (the first
    name of that family in adapters.ini), or None when no registered adapter serves that model_type."""
    from msmodelslim.model.registry import adapter_class, hf_families

    model_type = read_json(Path(path) / "config.json").get("model_type")
    names = hf_families().get(model_type) if isinstance(model_type, str) else None
    if not names:
        return None
    adapter = adapter_class(names[0])(names[0], path, trust_remote_code)
    if not hasattr(adapter, "init_skeleton"):
        return None
    return adapter.config, adapter.init_skeleton()
