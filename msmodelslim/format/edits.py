"""What a transform may need from the saved checkpoint besides its tensors (any format)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OutputEdits:
    config: dict = field(default_factory=dict)  # keys set in the written config.json (and its text_config)
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # extra safetensors, relative path
    optional: dict = field(default_factory=dict)  # merged into the description's "optional" entry
    # entries added to the ascendv1 description that name no tensor (e.g. `<attn>.indexer.quant_type`, formats.md A.6)
    description: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # merged into the description's "metadata" entry (online QuaRot)

    def merge(self, other: "OutputEdits") -> "OutputEdits":
        return OutputEdits({**self.config, **other.config}, {**self.files, **other.files},
                           {**self.optional, **other.optional}, {**self.description, **other.description},
                           {**self.metadata, **other.metadata})
