from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from msmodelslim.processor.matching import Pattern


class FloatSparseConfig(BaseModel):
    """`type: float_sparse`: ADMM pruning of the selected linears' float weights to `sparse_ratio` zeros, then the
    established tool's short-mantissa rounding; written as ascendv1 `W16A16S`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float_sparse"]
    sparse_ratio: float = Field(0.3, ge=0, le=1, description="share of each layer's weights set to zero")
    include: list[Pattern] = Field(default_factory=list, description="empty: every linear of the decoder layers")
    exclude: list[Pattern] = Field(default_factory=list)

    @property
    def selection(self) -> tuple[list[str], list[str]]:
        """(include, exclude) as patterns: the protocol's empty include means all."""
        return (list(self.include) or ["*"]), list(self.exclude)
