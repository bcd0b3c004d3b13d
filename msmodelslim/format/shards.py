"""Streaming tensors into size-bounded safetensors shards: each shard is written as soon as it is full, so a
layer-wise run never holds more than one shard of output. Shards get temporary names until `finish`, which
names them (the format decides how) and writes the index."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file


class ShardStream:
    def __init__(self, out_dir: Path, limit_bytes: int) -> None:
        self.out_dir = out_dir
        self.limit = limit_bytes  # 0 = everything in one file
        self.names: list[str] = []
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_ptrs: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or name in self.names:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.limit and self._pending and self._pending_bytes + size >= self.limit:
            self.flush()
        shares_storage = tensor.untyped_storage().nbytes() != size or tensor.data_ptr() in self._pending_ptrs
        self._pending[name] = tensor.clone() if shares_storage else tensor  # e.g. tied embeddings
        self._pending_ptrs.add(self._pending[name].data_ptr())
        self._pending_bytes += size
        self.total_bytes += size
        self.names.append(name)

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes, self._pending_ptrs = {}, 0, set()

    @property
    def shard_count(self) -> int:
        """Shards written so far plus the one still pending."""
        return len(self._shards) + bool(self._pending)

    def finish(self, shard_name: Callable[[int, int], str], index_name: Optional[str]) -> dict[str, str]:
        """Rename shard i of n (1-based) to shard_name(i, n); write {index_name} unless it is None.
        Returns the weight map {tensor name: file name}."""
        self.flush()
        weight_map: dict[str, str] = {}
        count = len(self._shards)
        for i, (path, names) in enumerate(self._shards, start=1):
            final = shard_name(i, count)
            path.rename(self.out_dir / final)
            weight_map.update({n: final for n in names})
        if index_name is not None:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / index_name).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return weight_map
