"""Checkpoints whose weights are stored compressed-tensors "pack-quantized" (Kimi-K2-Thinking's int4 experts):
each such linear `X` is on disk as `X.weight_packed` (int32 words, eight int4 codes each), `X.weight_scale`
(one scale per group of input columns), `X.weight_shape` ([N, K]) and, when asymmetric, `X.weight_zero_point`.

They are dequantized on load with the compressed-tensors library (the format's own code, not a copy of it), so
the algorithms see the float weights W = scale · q (per group), under the name `X.weight` the model reads. The
parts are the weight's storage: `names()` lists `X.weight` in their place, so nothing is reported as unread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.model.checkpoint import SafetensorsCheckpoint, read_json

PACK_QUANTIZED = "pack-quantized"
PACKED = ".weight_packed"
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _as_dict(quantization_config: Any) -> Optional[dict]:
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        return quantization_config
    to_dict = getattr(quantization_config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def pack_quantized_scheme(quantization_config: Any, where: str):
    """The compressed-tensors QuantizationScheme of a pack-quantized config.json `quantization_config`, or None
    when the checkpoint is not compressed-tensors pack-quantized. Refused (before any weight is read) when its
    packed weights could need different arguments: several config groups with different weight arguments."""
    config = _as_dict(quantization_config)
    if not config or config.get("quant_method") != "compressed-tensors":
        return None
    from compressed_tensors.quantization import QuantizationConfig

    try:
        parsed = QuantizationConfig.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, or a malformed group
        raise InvalidModelError(f"{where}: quantization_config is not a valid compressed-tensors config: "
                                f"{' '.join(str(exc).split())[:300]}") from None
    formats = {parsed.format} | {g.format for g in parsed.config_groups.values() if getattr(g, "format", None)}
    formats.discard(None)
    if PACK_QUANTIZED not in formats:
        raise UnsupportedError(f"{where}: compressed-tensors format {sorted(formats) or 'unknown'} is not supported; "
                               f"msmodelslim dequantizes {PACK_QUANTIZED} int weights (and block-FP8) on load. Convert "
                               f"the checkpoint to bfloat16 first")
    schemes = [g for g in parsed.config_groups.values() if g.weights is not None]
    distinct = {g.weights.model_dump_json() for g in schemes}
    if len(distinct) != 1:
        raise UnsupportedError(f"{where}: {len(distinct)} different weight quantizations in quantization_config."
                               f"config_groups; only one pack-quantized weight scheme per checkpoint is supported")
    return schemes[0]


class PackQuantizedCheckpoint(SafetensorsCheckpoint):
    """A safetensors checkpoint whose pack-quantized linears read back as float `X.weight` (float32)."""

    def __init__(self, model_path: str | Path, scheme) -> None:
        super().__init__(model_path)
        self.scheme = scheme
        stored = super().names()
        self._packed: dict[str, str] = {}  # "X.weight" -> "X"
        for name in stored:
            if name.endswith(PACKED):
                prefix = name[: -len(PACKED)]
                missing = [p for p in ("weight_scale", "weight_shape") if f"{prefix}.{p}" not in self._file_of]
                if missing:
                    raise InvalidModelError(f"{self.path}: {name} without {', '.join(f'{prefix}.{m}' for m in missing)}"
                                            f"; the pack-quantized checkpoint is incomplete")
                self._packed[f"{prefix}.weight"] = prefix
        parts = {f"{p}.{s}" for p in self._packed.values() for s in PARTS}
        self._names = [n for n in stored if n not in parts] + list(self._packed)
        self._packed_shapes: Optional[dict[str, tuple[int, ...]]] = None  # read on the first shape() asked

    def names(self) -> list[str]:
        return list(self._names)

    def is_packed(self, name: str) -> bool:
        """Whether `name` (an `X.weight`) is stored pack-quantized, i.e. dequantized by `load`."""
        return name in self._packed

    def shape(self, name: str) -> tuple[int, ...] | None:
        prefix = self._packed.get(name)
        if prefix is None:
            return super().shape(name)
        if self._packed_shapes is None:  # every [N, K] at once: one pass over each file, not one per weight
            stored = self._read([f"{p}.weight_shape" for p in self._packed.values()])
            self._packed_shapes = {key.removesuffix(".weight_shape"): tuple(int(v) for v in t.reshape(-1).tolist())
                                   for key, t in stored.items()}
        return self._packed_shapes[prefix]

    def file_of(self, name: str) -> str | None:
        prefix = self._packed.get(name)
        return super().file_of(prefix + PACKED if prefix is not None else name)

    def original_dtype(self, name: str) -> torch.dtype | None:
        return None if name in self._packed else super().original_dtype(name)  # dequantized: the model dtype applies

    def stored_dtype(self, name: str) -> str | None:
        return None if name in self._packed else self._dtype_of.get(name)

    def prefetch(self, names: list[str]) -> None:
        super().prefetch([part for n in names for part in self._parts(n)])

    def _parts(self, name: str) -> list[str]:
        prefix = self._packed.get(name)
        if prefix is None:
            return [name]
        return [f"{prefix}.{p}" for p in PARTS if f"{prefix}.{p}" in self._file_of]

    def load(self, names: list[str], fp8_block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
        packed = [n for n in names if n in self._packed]
        out = super().load([n for n in names if n not in self._packed], fp8_block)
        for name in packed:
            out[name] = self._dequantize(name)
        return out

    def _dequantize(self, name: str) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        prefix = self._packed[name]
        stored = self._read(self._parts(name))
        state = {key.rpartition(".")[2]: tensor for key, tensor in stored.items()}
        try:
            weight = PackedQuantizationCompressor.decompress(state, self.scheme)["weight"]
        except (ValueError, RuntimeError, TypeError, AssertionError) as exc:
            raise InvalidModelError(f"{self.path}: pack-quantized weight {prefix} cannot be unpacked "
                                    f"({' '.join(str(exc).split())[:200]})") from None
        return weight.float()


def open_checkpoint(model_path: str | Path, config: Any = None) -> SafetensorsCheckpoint:
    """The checkpoint reader config.json calls for: pack-quantized weights dequantized on load when its
    quantization_config says compressed-tensors pack-quantized, plain safetensors (block-FP8 included) otherwise.
    `config`: the loaded config; without it, config.json is read as plain JSON (no transformers, no code)."""
    config_file = Path(model_path) / "config.json"
    if config is not None:
        quantization_config = getattr(config, "quantization_config", None)
    else:
        quantization_config = read_json(config_file).get("quantization_config") if config_file.is_file() else None
    scheme = pack_quantized_scheme(quantization_config, str(config_file))
    return SafetensorsCheckpoint(model_path) if scheme is None else PackQuantizedCheckpoint(model_path, scheme)
