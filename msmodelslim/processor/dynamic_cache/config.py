from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from msmodelslim.processor.matching import Pattern
from msmodelslim.quantizer.scheme import QConfig, QDType, QScope


class DynamicCacheConfig(BaseModel):
    """`type: dynamic_cache`: int8 KV cache (C8) for the selected attention modules (empty include: all)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["dynamic_cache"]
    qconfig: QConfig
    include: list[Pattern] = Field(default_factory=list)
    exclude: list[Pattern] = Field(default_factory=list)

    @field_validator("qconfig")
    @classmethod
    def _c8_only(cls, q: QConfig) -> QConfig:
        if (q.dtype, q.scope, q.method) != (QDType.int8, QScope.per_channel, "minmax"):
            raise ValueError(f"dynamic_cache (C8) is int8 per_channel minmax, got {q.dtype.value} {q.scope.value} "
                             f"{q.method}; write qconfig: {{dtype: int8, scope: per_channel, symmetric: true, "
                             f"method: minmax}}")
        if not q.symmetric:
            raise ValueError("symmetric: false is refused: vLLM-Ascend quantizes the cache with kv_cache_offset but "
                             "dequantizes it with kv_cache_scale alone (formats.md A.6), so a non-zero offset would "
                             "shift every cached K and V by offset·scale; use symmetric: true")
        return q
