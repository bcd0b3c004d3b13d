from typing import Literal

from pydantic import Field

from msmodelslim.processor.smooth_quant.config import ALL_SUBGRAPH_KINDS, SmoothingFields, SubgraphKind


class IterSmoothConfig(SmoothingFields):
    """`type: iter_smooth`: the established tool's smoothing, subgraph by subgraph in a fixed priority."""

    type: Literal["iter_smooth"]
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the activation range in the scale")
    scale_min: float = Field(1e-5, gt=0, description="lower bound of every scale")
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: list(ALL_SUBGRAPH_KINDS))
