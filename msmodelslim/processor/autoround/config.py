from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.processor.matching import Pattern
from msmodelslim.quantizer.scheme import LinearQConfig

SCALE_DTYPES = ("float16", "float32", "bfloat16")


class AutoRoundStrategy(BaseModel):
    """One {qconfig, include, exclude} of `autoround_quant.strategies`. The weight `method` is `autoround`
    (the established protocol does not check it; `minmax`, the starting point, is accepted too)."""

    model_config = ConfigDict(extra="forbid")

    qconfig: LinearQConfig
    include: list[Pattern] = Field(default_factory=lambda: ["*"])
    exclude: list[Pattern] = Field(default_factory=list)
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "bfloat16"

    @model_validator(mode="before")
    @classmethod
    def _autoround_method(cls, data: Any) -> Any:
        """Map method autoround onto the min/max start the tuning begins from; lift ext.scale_dtype out."""
        if not isinstance(data, dict) or not isinstance(data.get("qconfig"), dict):
            return data
        qconfig = dict(data["qconfig"])
        weight = dict(qconfig.get("weight") or {})
        method = weight.get("method", "autoround")
        if method not in ("autoround", "minmax"):
            raise ValueError(f"autoround_quant tunes the weight rounding itself; weight.method {method!r} does not "
                             f"apply (use method: autoround)")
        ext = dict(weight.get("ext") or {})
        scale_dtype = ext.pop("scale_dtype", None)
        if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"ext.scale_dtype {scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
        qconfig["weight"] = {**weight, "method": "minmax", "ext": ext}
        act = qconfig.get("act")
        if isinstance(act, dict) and act.get("method") == "autoround":
            qconfig["act"] = {**act, "method": "minmax"}
        result = {**data, "qconfig": qconfig}
        if scale_dtype is not None:
            result["scale_dtype"] = scale_dtype
        return result

    @model_validator(mode="after")
    def _integer_grid(self) -> "AutoRoundStrategy":
        """The tuning rounds onto an integer grid with a float scale; an FP8/MX grid is a different search."""
        dtype = self.qconfig.weight.dtype
        if dtype.element is not None:
            raise ValueError(f"autoround_quant on {dtype.value} weights is not implemented yet (it belongs to the "
                             f"floating-point formats work); quantize them with linear_quant, method minmax")
        return self


class AutoRoundQuantConfig(BaseModel):
    """`type: autoround_quant`: quantize linears with AutoRound-tuned weight rounding and clipping."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["autoround_quant"]
    iters: int = Field(10, gt=0, description="signed-gradient steps per linear")
    lr: float = Field(0.005, gt=0, description="signed-gradient step size (this project's addition)")
    enable_minmax_tuning: bool = True
    enable_round_tuning: bool = True
    strategies: list[AutoRoundStrategy] = Field(min_length=1)
