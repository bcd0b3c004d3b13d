"""Read tensors from a Hugging Face safetensors checkpoint on demand (one block at a time, memory-mapped).

Block-FP8 checkpoints (DeepSeek-V3/R1 as published: float8_e4m3fn weights, each with a `<name>_scale_inv`
tensor holding one scale per [128, 128] block) are dequantized while loading, so the algorithms see the
weights the model was trained with.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.core.logging import get_logger

log = get_logger("model.checkpoint")


INDEX_SUFFIX = ".safetensors.index.json"


class SafetensorsCheckpoint:
    """The tensors of `model_path`. With a `*.safetensors.index.json`, only the files its weight_map names are
    read (a stray copy next to the shards is ignored, with a warning); without one, every `*.safetensors` is read
    and a tensor found in two files is refused (which one is right is unknowable)."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        self._file_of: dict[str, str] = {}
        self._dtype_of: dict[str, torch.dtype] = {}
        self._shape_of: dict[str, tuple[int, ...]] = {}
        self._span_of: dict[str, tuple[int, int]] = {}  # absolute [start, end) of a tensor's bytes in its file
        present = sorted(p.name for p in self.path.glob("*.safetensors"))
        index_file, index = self._read_index()
        files = sorted(set(index.values())) if index is not None else present
        if index is not None:
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise InvalidModelError(f"{index_file} names {missing[:3]}, missing from {self.path}; the download is "
                                        f"incomplete (download the checkpoint again)")
            strays = [f for f in present if f not in files]
            if strays:
                log.warning("%s: %s not named by %s, ignored", self.path, ", ".join(strays), index_file.name)
        if not files:
            raise InvalidModelError(
                f"{self.path} holds no *.safetensors weights; msmodelslim reads safetensors checkpoints only "
                f"(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        for name in files:
            try:
                with safe_open(self.path / name, framework="pt") as f:
                    for key in f.keys():
                        if index is not None and index.get(key, name) != name:
                            continue  # the index places this tensor in another file
                        if key in self._file_of:
                            raise InvalidModelError(
                                f"tensor {key} is in both {self.path / self._file_of[key]} and {self.path / name}; "
                                f"remove the stray file (or add the model.safetensors.index.json that names the "
                                f"right one)")
                        self._file_of[key] = name
                        stored = f.get_slice(key)
                        self._dtype_of[key] = stored.get_dtype()
                        self._shape_of[key] = tuple(stored.get_shape())
                self._span_of.update({k: v for k, v in _byte_spans(self.path / name).items()
                                      if self._file_of.get(k) == name})
            except InvalidModelError:
                raise
            except Exception as exc:  # a truncated or foreign file: say which one
                raise InvalidModelError(f"{self.path / name} is not a readable safetensors file: {exc}") from None
        lacking = [k for k, f in (index or {}).items() if self._file_of.get(k) != f]
        if lacking:
            raise InvalidModelError(f"{index_file} maps {lacking[0]} to {index[lacking[0]]}, which lacks it "
                                    f"({len(lacking)} such tensor(s)); the index and the shards do not match "
                                    f"(download the checkpoint again)")

    def _read_index(self) -> tuple[Path | None, dict[str, str] | None]:
        """(index file, weight_map) of the checkpoint's safetensors index, or (None, None) without one."""
        indexes = sorted(self.path.glob("*" + INDEX_SUFFIX))
        if not indexes:
            return None, None
        preferred = [p for p in indexes if p.name == "model" + INDEX_SUFFIX]
        if not preferred and len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise InvalidModelError(f"{self.path} holds several safetensors indexes ({names}); keep the one that "
                                    f"belongs to the model")
        index_file = (preferred or indexes)[0]
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()):
            raise InvalidModelError(f"{index_file} is malformed: expected a 'weight_map' object mapping tensor names "
                                    f"to file names in the same directory")
        return index_file, weight_map

    def file_of(self, name: str) -> str | None:
        """The file (in the model directory) a tensor is read from."""
        return self._file_of.get(name)

    def names(self) -> list[str]:
        return list(self._file_of)

    def stored_dtype(self, name: str) -> str | None:
        """The dtype as the safetensors header spells it (e.g. "BF16", "F8_E4M3"); None when absent."""
        return self._dtype_of.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape (from the header); None when absent."""
        return self._shape_of.get(name)

    def is_packed(self, name: str) -> bool:
        """Whether `name` is stored pack-quantized (packed_checkpoint.py); never in a plain checkpoint."""
        return False

    def original_dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype; None when absent or float8 (dequantized on load, so the model dtype applies)."""
        dtype = STORED_DTYPES.get(self._dtype_of.get(name))
        return None if dtype in FP8_DTYPES else dtype

    def prefetch(self, names: list[str]) -> None:
        """Start reading these tensors into the page cache and return at once, so that the next block's read
        overlaps the current block's work (a background thread issues POSIX_FADV_WILLNEED hints)."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for name in names:
            if name in self._span_of:
                spans.setdefault(self._file_of[name], []).append(self._span_of[name])
        if spans and hasattr(os, "posix_fadvise"):
            threading.Thread(target=_advise_will_need, args=(self.path, spans), daemon=True).start()

    def load(self, names: list[str], fp8_block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
        """The named tensors; float8 weights come back dequantized with their `_scale_inv` blocks."""
        out = self._read(names)
        fp8 = [n for n, t in out.items() if t.dtype in FP8_DTYPES]
        missing = [f"{n}_scale_inv" for n in fp8 if f"{n}_scale_inv" not in self._file_of]
        if missing:
            raise InvalidModelError(f"{self.path}: float8 tensors without their block scales ({missing[:3]}); "
                                    f"convert the checkpoint to bfloat16 first")
        scales = self._read([f"{n}_scale_inv" for n in fp8])
        for name in fp8:
            out[name] = dequantize_fp8_blocks(out[name], scales[f"{name}_scale_inv"], fp8_block, name)
        return out

    def read_index(self, name: str, index: int) -> torch.Tensor:
        """`name`[index] along its first dimension (e.g. one expert of a stacked experts tensor), reading only that
        part of the file."""
        if name not in self._file_of:
            raise InvalidModelError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        with safe_open(self.path / self._file_of[name], framework="pt") as f:
            return f.get_slice(name)[index:index + 1][0].contiguous()

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors exactly as stored (float8 ones not dequantized)."""
        return self._read(names)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
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


def _byte_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Every tensor's absolute byte range, from the safetensors header (u64 little-endian length, then JSON
    whose `data_offsets` count from the end of the header)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    base = 8 + length
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


# Linux reads at most one readahead window (the device's read_ahead_kb, 128 KiB by default) per WILLNEED call,
# whatever the length asked: one hint per 32 MB tensor brought 8 MB of it in (read_ahead_kb 8192), the rest was
# read only when first touched. Hints of one default window each are all honoured (400 MB resident in under a
# second from 3,000 calls taking 0.1 s in all).
WILL_NEED_PIECE = 128 << 10


def _advise_will_need(directory: Path, spans: dict[str, list[tuple[int, int]]]) -> None:
    for file, ranges in spans.items():
        try:
            fd = os.open(directory / file, os.O_RDONLY)
        except OSError:
            continue  # only a hint: the real read reports any problem
        try:
            for start, end in ranges:
                for piece in range(start, end, WILL_NEED_PIECE):
                    os.posix_fadvise(fd, piece, min(WILL_NEED_PIECE, end - piece), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          name: str = "weight") -> torch.Tensor:
    """W[n, k] = W_fp8[n, k] · scale_inv[n // bn, k // bk] in float32 (bn, bk = block; edge blocks may be short)."""
    rows, cols = block
    blocks = (-(-weight.shape[0] // rows), -(-weight.shape[-1] // cols))  # ceiling divisions
    if weight.dim() != 2 or tuple(scale_inv.shape) != blocks:
        raise InvalidModelError(f"{name}: float8 weight {list(weight.shape)} and block scales "
                                f"{list(scale_inv.shape)} do not match blocks of {list(block)}")
    scale = scale_inv.float().repeat_interleave(rows, 0)[: weight.shape[0]]
    return weight.float() * scale.repeat_interleave(cols, 1)[:, : weight.shape[1]]


def fp8_block_size(config) -> tuple[int, int]:
    """The `[rows, cols]` block of a block-FP8 checkpoint's `quantization_config` (DeepSeek-V3: 128 x 128)."""
    quant = getattr(config, "quantization_config", None) or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else getattr(quant, "weight_block_size", None)
    return (int(block[0]), int(block[1])) if block else (128, 128)


STORED_DTYPES = {  # the safetensors header's dtype names
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or an InvalidModelError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidModelError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
