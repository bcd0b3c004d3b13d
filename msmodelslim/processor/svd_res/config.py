from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from msmodelslim.processor.matching import Pattern


class SvdResConfig(BaseModel):
    """`type: svd_res`: split each selected linear's weight into a rank-`rank` part kept in high precision and a
    residual that the following `linear_quant` quantizes (SVDQuant, processor/svd_res/processor.py)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["svd_res"]
    rank: int = Field(32, gt=0, description="rank of the high-precision branch (at most min(out, in) of every layer)")
    include: list[Pattern] = Field(default_factory=lambda: ["*"])
    exclude: list[Pattern] = Field(default_factory=list)
