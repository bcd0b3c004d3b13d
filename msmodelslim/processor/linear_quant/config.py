from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from msmodelslim.processor.matching import Pattern
from msmodelslim.quantizer.scheme import LinearQConfig


class LinearQuantConfig(BaseModel):
    """`type: linear_quant`: quantize the selected nn.Linear modules with one qconfig."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear_quant"]
    qconfig: LinearQConfig
    include: list[Pattern] = Field(default_factory=lambda: ["*"])
    exclude: list[Pattern] = Field(default_factory=list)
