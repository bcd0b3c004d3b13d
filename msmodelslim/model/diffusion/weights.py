"""The denoiser's weights read from its safetensors files one block at a time (what keeps a layer-wise run near
one block of memory): the files diffusers wrote, `diffusion_pytorch_model.safetensors` or its shards with
`diffusion_pytorch_model.safetensors.index.json`. Tensor names are the module's state_dict names."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from msmodelslim.core.errors import InvalidModelError

INDEX = "diffusion_pytorch_model.safetensors.index.json"


class DenoiserWeights:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file_of: dict[str, Path] = {}
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidModelError(f"{index} is not a readable safetensors index: {exc}") from None
            self.file_of = {name: folder / file for name, file in weight_map.items()}
        else:
            for file in sorted(folder.glob("*.safetensors")):
                with _open(file) as f:
                    self.file_of.update({name: file for name in f.keys()})
        if not self.file_of:
            raise InvalidModelError(f"{folder} holds no safetensors weights")

    def load(self, prefix: str) -> dict[str, torch.Tensor]:
        """{name without `prefix`: tensor} for every tensor whose name starts with `prefix` ('' for all)."""
        by_file: dict[Path, list[str]] = {}
        for name, file in self.file_of.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with _open(file) as f:
                out.update({name[len(prefix):]: f.get_tensor(name) for name in names})
        return out

    def materialize(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Load the module's tensors (names under `prefix`, except those starting with one of `skip`) into a
        module built on the meta device; every parameter must be found."""
        state = {k: v for k, v in self.load(prefix).items() if not k.startswith(skip)}
        try:
            result = module.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            raise InvalidModelError(f"{self.folder}: tensors under {prefix or 'the top level'!r} do not match the "
                                    f"config.json architecture: {' '.join(str(exc).split())[:300]}") from None
        missing = [k for k in result.missing_keys if not k.startswith(skip)]
        if missing or result.unexpected_keys:
            raise InvalidModelError(f"{self.folder}: tensors under {prefix or 'the top level'!r} do not match the "
                                    f"config.json architecture (missing {missing[:4]}, unexpected "
                                    f"{result.unexpected_keys[:4]})")


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise InvalidModelError(f"{file} is not a readable safetensors file: {exc}") from None
