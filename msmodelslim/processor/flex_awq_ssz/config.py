from typing import Literal, Optional

from pydantic import Field, model_validator

from msmodelslim.processor.smooth_quant.config import ALL_SUBGRAPH_KINDS, SmoothingFields, SubgraphKind
from msmodelslim.quantizer.scheme import LinearQConfig, QConfig

SCORING_METHODS = ("minmax", "ssz")


def _check_scoring_method(weight: QConfig, field: str) -> None:
    if weight.method not in SCORING_METHODS:
        raise ValueError(f"{field}.method {weight.method!r} cannot score the scale candidates (each candidate is "
                         f"quantized once); use minmax or ssz here and keep {weight.method} in the following "
                         f"linear_quant")


class FlexAwqSszConfig(SmoothingFields):
    """`type: flex_awq_ssz`: per-subgraph scales s = mean|X|^α / mean|Ŵ|^β searched against the error of the
    real quantizer given in `qconfig` (usually the same qconfig as the linear_quant that follows)."""

    type: Literal["flex_awq_ssz"]
    alpha: Optional[float] = Field(None, ge=0, le=1, description="exponent of the activation mean; empty = search")
    beta: Optional[float] = Field(None, ge=0, le=1, description="exponent of the weight mean; empty = search")
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: list(ALL_SUBGRAPH_KINDS))
    qconfig: LinearQConfig

    @model_validator(mode="after")
    def _check(self) -> "FlexAwqSszConfig":
        _check_scoring_method(self.qconfig.weight, "qconfig.weight")
        return self


class AwqConfig(SmoothingFields):
    """`type: awq`: plain AWQ, i.e. flex_awq_ssz with β = 0 (s = mean|X|^α), α on an n_grid grid in [0, 1),
    scored on the weight-only quantized output."""

    type: Literal["awq"]
    weight_qconfig: QConfig
    n_grid: int = Field(20, ge=2, le=200)
    enable_subgraph_type: list[SubgraphKind] = Field(default_factory=lambda: list(ALL_SUBGRAPH_KINDS))

    @model_validator(mode="after")
    def _check(self) -> "AwqConfig":
        LinearQConfig(weight=self.weight_qconfig)  # a deployable weight-only scheme, or a clear error
        _check_scoring_method(self.weight_qconfig, "weight_qconfig")
        return self
