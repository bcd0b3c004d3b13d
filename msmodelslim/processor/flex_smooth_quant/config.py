from typing import Literal, Optional

from pydantic import Field

from msmodelslim.processor.smooth_quant.config import ALL_SUBGRAPH_KINDS, SmoothingFields, SubgraphKind


class FlexSmoothQuantConfig(SmoothingFields):
    """`type: flex_smooth_quant`: smoothing whose exponents are searched per subgraph against the quantized
    error. alpha/beta left empty are searched (two stages: alpha with beta = 1 - alpha, then beta)."""

    type: Literal["flex_smooth_quant"]
    alpha: Optional[float] = Field(None, ge=0, le=1, description="exponent of the activation range; empty = search")
    beta: Optional[float] = Field(None, ge=0, le=1, description="exponent of the weight range; empty = search")
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: list(ALL_SUBGRAPH_KINDS))
    # This project's addition, for smoothing-only runs: the activation quantization the search assumes when no
    # later step of spec.process quantizes (per_token = W8A8_DYNAMIC, the default with a warning; per_tensor =
    # static asymmetric int8, W8A8). With later quantization steps, each target is scored with the scheme they
    # give it, and a contradicting act_scope is an error.
    act_scope: Optional[Literal["per_token", "per_tensor"]] = None
