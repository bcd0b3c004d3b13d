from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from msmodelslim.processor.matching import Pattern

SubgraphKind = Literal["norm-linear", "linear-linear", "ov", "up-down"]
ALL_SUBGRAPH_KINDS: list[SubgraphKind] = ["norm-linear", "linear-linear", "ov", "up-down"]


class SmoothingFields(BaseModel):
    """Fields every smoothing processor shares."""

    model_config = ConfigDict(extra="forbid")

    symmetric: bool = True
    include: Optional[list[Pattern]] = None  # patterns over target linear names; None = all
    exclude: Optional[list[Pattern]] = None

    @field_validator("symmetric")
    @classmethod
    def _only_symmetric(cls, value: bool) -> bool:
        if not value:
            raise ValueError("symmetric: false (a channel shift, as in Outlier Suppression+) is not implemented: "
                             "the serving engines' RMSNorm has no bias to fold the shift into")
        return value


class SmoothQuantConfig(SmoothingFields):
    """`type: smooth_quant`: move activation outliers into the weights before quantization."""

    type: Literal["smooth_quant"]
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 keeps activations, 1 flattens them")
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: ["norm-linear"])
