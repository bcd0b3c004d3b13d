from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from msmodelslim.processor.matching import Pattern


class KVSmoothConfig(BaseModel):
    """`type: kv_smooth`: move per-channel scales of K into Q before RoPE (attention scores unchanged)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["kv_smooth"]
    smooth_factor: float = Field(1.0, gt=0, description="s = (max|K| per RoPE pair) ** smooth_factor")
    include: list[Pattern] = Field(default_factory=lambda: ["*"])  # attention modules
    exclude: list[Pattern] = Field(default_factory=list)
