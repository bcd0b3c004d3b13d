from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from msmodelslim.processor.matching import Pattern
from msmodelslim.quantizer.scheme import QConfig, QDType, QScope


# The KV caches a serving engine reads: (dtype, scope) -> where.
KV_CACHE_SCHEMES = {
    (QDType.int8, QScope.per_channel): "C8: vLLM-Ascend's int8 cache, one scale per K/V channel (ascendv1_saver)",
    (QDType.fp8_e4m3, QScope.per_tensor): "vLLM's FP8 E4M3 cache, one scale per K and V tensor (compressed_tensors)",
}


class DynamicCacheConfig(BaseModel):
    """`type: dynamic_cache`: a quantized KV cache for the selected attention modules (empty include: all): int8
    per channel (C8, ascendv1) or FP8 E4M3 per tensor (vLLM's kv_cache_scheme, compressed-tensors)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["dynamic_cache"]
    qconfig: QConfig
    include: list[Pattern] = Field(default_factory=list)
    exclude: list[Pattern] = Field(default_factory=list)

    @field_validator("qconfig")
    @classmethod
    def _c8_only(cls, q: QConfig) -> QConfig:
        if (q.dtype, q.scope) not in KV_CACHE_SCHEMES or q.method != "minmax":
            raise ValueError(f"dynamic_cache (C8) is int8 per_channel minmax, got {q.dtype.value} {q.scope.value} "
                             f"{q.method}; write qconfig: {{dtype: int8, scope: per_channel, symmetric: true, "
                             f"method: minmax}} (or, for vLLM's FP8 cache in compressed_tensors, {{dtype: fp8_e4m3, "
                             f"scope: per_tensor, symmetric: true, method: minmax}})")
        if not q.symmetric:
            raise ValueError("symmetric: false is refused: vLLM-Ascend quantizes the cache with kv_cache_offset but "
                             "dequantizes it with kv_cache_scale alone (formats.md A.6), so a non-zero offset would "
                             "shift every cached K and V by offset·scale; use symmetric: true")
        return q
