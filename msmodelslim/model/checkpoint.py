"""Read tensors from a Hugging Face safetensors checkpoint on demand (one block at a time, memory-mapped)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from msmodelslim.core.errors import InvalidModelError


class SafetensorsCheckpoint:
    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        self._file_of: dict[str, str] = {}
        self._dtype_of: dict[str, torch.dtype] = {}
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise InvalidModelError(
                f"{self.path} holds no *.safetensors weights; msmodelslim reads safetensors checkpoints only "
                f"(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        for name in files:
            try:
                with safe_open(self.path / name, framework="pt") as f:
                    for key in f.keys():
                        self._file_of[key] = name
                        self._dtype_of[key] = f.get_slice(key).get_dtype()
            except Exception as exc:  # a truncated or foreign file: say which one
                raise InvalidModelError(f"{self.path / name} is not a readable safetensors file: {exc}") from None

    def names(self) -> list[str]:
        return list(self._file_of)

    def original_dtype(self, name: str) -> torch.dtype | None:
        return _DTYPES.get(self._dtype_of.get(name))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise InvalidModelError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(self.path / file, framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelError(f"{path} is not valid JSON: {exc}") from None
