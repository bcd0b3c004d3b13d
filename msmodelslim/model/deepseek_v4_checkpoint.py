"""DeepSeek-V4's release format, dequantized on load: what DeepSeek publishes is not bf16.

- FP8 linears (attention, shared experts; every routed expert in V4-Flash-Base): `X.weight` float8 e4m3 with
  `X.scale`, one scale per [128, 128] block (config.json quantization_config.weight_block_size), stored as e8m0
  exponents (ue8m0, V4-Flash) or float32 (V4-Flash-Base): W = e4m3 · scale[n // 128, k // 128].
- FP4 routed experts (V4-Flash, `expert_dtype: fp4`, vLLM's MXFP4 path): `X.weight` int8 [N, K/2], two e2m1 codes per
  byte, column 2j in the low nibble and 2j+1 in the high one (sign bit 3; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), with
  `X.scale` e8m0 [N, K/32], one power of two per 32 columns: W = e2m1 · 2^(e - 127).

The algorithms then see the float weights under `X.weight` (float32); the `.scale` tensors are their storage,
hidden from `names()` and consumed (model/passthrough.consumed_reason), so nothing is reported unread and the output,
written from the float weights, needs them no more.
"""
from __future__ import annotations

from pathlib import Path

import torch

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.model.checkpoint import SafetensorsCheckpoint, dequantize_fp8_blocks

RELEASE_SCALE = ".scale"
FP8_STORED = "F8_E4M3"
FP4_STORED = ("I8", "U8")  # two e2m1 codes per byte
FP4_GROUP = 32
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def release_scaled_weights(names: set[str]) -> dict[str, str]:
    """{`X.weight`: `X.scale`} for every weight stored with a release-format scale companion."""
    return {n[: -len(RELEASE_SCALE)] + ".weight": n for n in names
            if n.endswith(RELEASE_SCALE) and n[: -len(RELEASE_SCALE)] + ".weight" in names}


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales from e8m0 exponent bytes (2^(e - 127)) or from float scales as they are."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return torch.pow(2.0, scale.view(torch.uint8).to(torch.float64) - 127).float()
    return scale.float()


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """[N, K/2] bytes of e2m1 pairs (low nibble first) times one scale per 32 columns -> float32 [N, K]."""
    codes = packed.view(torch.uint8)
    rows, columns = codes.shape[0], 2 * codes.shape[1]
    if codes.dim() != 2 or tuple(scale.shape) != (rows, columns // FP4_GROUP):
        raise InvalidModelError(f"{name}: FP4 weight {list(packed.shape)} (two codes a byte) and scales "
                                f"{list(scale.shape)} do not match groups of {FP4_GROUP} columns")
    pairs = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(rows, columns).long()
    return E2M1[pairs] * scale_values(scale).repeat_interleave(FP4_GROUP, dim=1)


class DeepseekV4ReleaseCheckpoint(SafetensorsCheckpoint):
    """A DeepSeek-V4 safetensors checkpoint whose FP8 / FP4 weights read back as float32 `X.weight`."""

    def __init__(self, model_path: str | Path, fp8_block: tuple[int, int]) -> None:
        super().__init__(model_path)
        self.fp8_block = fp8_block
        self._scaled = release_scaled_weights(set(super().names()))
        odd = [w for w in self._scaled if self._dtype_of[w] not in (FP8_STORED, *FP4_STORED)]
        if odd:
            raise InvalidModelError(f"{self.path}: {odd[0]} is stored as {self._dtype_of[odd[0]]} next to "
                                    f"{self._scaled[odd[0]]}; DeepSeek-V4's release format has float8 e4m3 or packed "
                                    f"FP4 (int8) weights there")
        scales = set(self._scaled.values())
        self._names = [n for n in super().names() if n not in scales]

    def names(self) -> list[str]:
        return list(self._names)

    def original_dtype(self, name: str) -> torch.dtype | None:
        return None if name in self._scaled else super().original_dtype(name)  # dequantized: the model dtype

    def stored_dtype(self, name: str) -> str | None:
        return None if name in self._scaled else self._dtype_of.get(name)

    def prefetch(self, names: list[str]) -> None:
        super().prefetch(names + [self._scaled[n] for n in names if n in self._scaled])

    def load(self, names: list[str], fp8_block: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        scaled = [n for n in names if n in self._scaled]
        out = super().load([n for n in names if n not in self._scaled], fp8_block or self.fp8_block)
        for name in scaled:
            stored = self._read([name, self._scaled[name]])
            weight, scale = stored[name], stored[self._scaled[name]]
            if self._dtype_of[name] == FP8_STORED:
                out[name] = dequantize_fp8_blocks(weight, scale_values(scale), fp8_block or self.fp8_block, name)
            else:
                out[name] = dequantize_fp4(weight, scale, name)
        return out
