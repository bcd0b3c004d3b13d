"""ascendv1 writer: streams tensors into size-bounded safetensors shards as blocks finish, then writes the
index, `quant_model_description.json` and the copied Hugging Face files.

Shard file names follow the established tool: `quant_model_weights-00001-of-0000N.safetensors` plus
`quant_model_weights.safetensors.index.json`, or a single `quant_model_weights.safetensors` when
part_file_size is 0 (then the whole quantized model is held until the end).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from msmodelslim.format.ascendv1.tensors import FLOAT, linear_tensors
from msmodelslim.format.edits import OutputEdits
from msmodelslim.ir.quant_linear import QuantLinear

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weights"
INDEX = f"{WEIGHTS}.safetensors.index.json"

# Lowest to highest; `model_quant_type` reports the highest present (informational for the engines).
TYPE_PRIORITY = ["FLOAT", "W8A16", "W4A16", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W8A8"]
COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja", ".model", ".tiktoken")


class AscendV1Writer:
    def __init__(
        self,
        out_dir: Path,
        part_file_size_gb: float,
        model_dtype: torch.dtype,
        is_row_parallel: Callable[[str], bool],
        dtype_for: Callable[[str], torch.dtype],
    ) -> None:
        self.out_dir = out_dir
        self.limit = int(part_file_size_gb * 2**30)
        self.model_dtype = model_dtype
        self.is_row_parallel = is_row_parallel
        self.dtype_for = dtype_for
        self.description: dict[str, str] = {}
        self.group_sizes: set[int] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_ptrs: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    # ---- adding tensors ----------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor, tag: str) -> None:
        if name in self.description:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.limit and self._pending and self._pending_bytes + size >= self.limit:
            self._flush()
        shares_storage = tensor.untyped_storage().nbytes() != size or tensor.data_ptr() in self._pending_ptrs
        self._pending[name] = tensor.clone() if shares_storage else tensor  # e.g. tied embeddings
        self._pending_ptrs.add(self._pending[name].data_ptr())
        self._pending_bytes += size
        self.total_bytes += size
        self.description[name] = tag

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        dtype = self.dtype_for(name) if tensor.is_floating_point() else tensor.dtype
        self.add(name, tensor.to(dtype), FLOAT)

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        """Every tensor under `root`: quantized linears in their ascendv1 layout, the rest as FLOAT."""
        for rel, module in root.named_modules():
            name = f"{prefix}.{rel}" if rel else prefix
            if isinstance(module, QuantLinear):
                if module.group_size is not None:
                    self.group_sizes.add(module.group_size)
                for suffix, (tensor, tag) in linear_tensors(module, self.model_dtype, self.is_row_parallel(name)).items():
                    self.add(f"{name}.{suffix}", tensor, tag)
                continue
            if any(isinstance(m, QuantLinear) for m in _ancestors(root, rel)):
                continue
            for pname, param in module.named_parameters(recurse=False):
                self.add_float(f"{name}.{pname}", param)
            for bname, buf in module.named_buffers(recurse=False):
                if buf is not None and bname not in module._non_persistent_buffers_set:
                    self.add_float(f"{name}.{bname}", buf)

    # ---- files -------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes, self._pending_ptrs = {}, 0, set()

    def finish(self, source_dir: Path, edits: OutputEdits | None = None) -> dict:
        """Write the remaining shard, the index and the description; copy the model's config/tokenizer files;
        apply the processors' edits (config keys, extra files such as optional/quarot.safetensors)."""
        edits = edits or OutputEdits()
        self._flush()
        weight_map: dict[str, str] = {}
        if self.limit == 0:
            (path, names), = self._shards or [(None, [])]
            final = f"{WEIGHTS}.safetensors"
            if path is not None:
                path.rename(self.out_dir / final)
            weight_map = {n: final for n in names}
        else:
            count = len(self._shards)
            for i, (path, names) in enumerate(self._shards, start=1):
                final = f"{WEIGHTS}-{i:05d}-of-{count:05d}.safetensors"
                path.rename(self.out_dir / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        if len(self.group_sizes) > 1:
            raise ValueError(f"ascendv1 has one global group_size, but layers use {sorted(self.group_sizes)}")
        present = set(self.description.values())
        model_quant_type = max((t for t in TYPE_PRIORITY if t in present), key=TYPE_PRIORITY.index, default="Unknown")
        description = dict(self.description)
        description.update({
            "version": "1.0.0",
            "model_quant_type": model_quant_type,
            "metadata": {},
            "group_size": next(iter(self.group_sizes), 0),
            "optional": edits.optional,
        })
        (self.out_dir / DESCRIPTION).write_text(json.dumps(description, indent=4), encoding="utf-8")
        for relative, tensors in edits.files.items():
            (self.out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.out_dir / relative))
        copy_model_files(source_dir, self.out_dir, edits.config)
        return description


def _ancestors(root: nn.Module, rel: str):
    parts = rel.split(".") if rel else []
    module = root
    for part in parts[:-1]:
        module = getattr(module, part)
        yield module


def copy_model_files(source_dir: Path, out_dir: Path, config_updates: dict | None = None) -> None:
    """Config, tokenizer and generation files; never weight indices; `quantization_config` removed and
    `config_updates` applied (also inside `text_config`, where a multimodal config keeps the LM keys)."""
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or not path.name.endswith(COPIED_SUFFIXES) or path.name.endswith("index.json"):
            continue
        if (out_dir / path.name).exists():
            continue
        shutil.copyfile(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config.update(config_updates or {})
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
            config["text_config"].update(config_updates or {})
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
