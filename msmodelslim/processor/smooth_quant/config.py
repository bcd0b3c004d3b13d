from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

SubgraphKind = Literal["norm-linear", "linear-linear", "ov", "up-down"]


class SmoothQuantConfig(BaseModel):
    """`type: smooth_quant`: move activation outliers into the weights before quantization."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["smooth_quant"]
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 keeps activations, 1 flattens them")
    symmetric: bool = True
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: ["norm-linear"])
    include: Optional[list[str]] = None  # patterns over target linear names; None = all
    exclude: Optional[list[str]] = None

    @field_validator("symmetric")
    @classmethod
    def _only_symmetric(cls, value: bool) -> bool:
        if not value:
            raise ValueError("symmetric: false (shifting, as in Outlier Suppression+) is not implemented yet")
        return value
