"""`type: online_quarot` settings (protocol.md §2.4): which of the adapter's rotation sites are rotated, and the
Hadamard block size."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, field_validator

from msmodelslim.processor.matching import Pattern


class OnlineQuaRotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["online_quarot"]
    include: Optional[list[Pattern]] = None  # rotation sites (full module names, e.g. blocks.0.attn1.q_rot); None: all
    exclude: Optional[list[Pattern]] = None
    block_size: int = -1  # -1: one Hadamard of the site's full size; b > 0: block-diagonal with b x b blocks

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value != -1 and (value <= 0 or value & (value - 1)):
            raise ValueError(f"block_size must be -1 (the full size) or a positive power of 2, got {value}")
        return value
