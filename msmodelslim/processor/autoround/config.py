from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.processor.matching import Pattern
from msmodelslim.quantizer.scheme import LinearQConfig

SCALE_DTYPES = ("float16", "float32", "bfloat16")


class AutoRoundStrategy(BaseModel):
    """One {qconfig, include, exclude} of `autoround_quant.strategies`. The weight `method` is `autoround`
    (the established protocol does not check it; `minmax`, the starting point, is accepted too). Integer
    weights and the float grids with one scale per channel or per MX block (fp8_e4m3, mxfp8, mxfp4) are tuned."""

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
        if weight.get("dtype") == "nvfp4" or weight.get("scope") == "dual_scale":
            # two levels of scales (NVFP4's FP8 block scales under a global one, dual_scale's float32 scale over
            # E8M0 ones): a different search from the one-scale grids the tuning models
            raise ValueError(f"autoround_quant does not tune {weight.get('dtype')} {weight.get('scope')} weights "
                             f"(two levels of scales); quantize them with linear_quant (minmax or gptq for nvfp4, "
                             f"dualscale for dual_scale)")
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

class AutoRoundQuantConfig(BaseModel):
    """`type: autoround_quant`: quantize linears with AutoRound-tuned weight rounding and clipping."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["autoround_quant"]
    iters: int = Field(10, gt=0, description="signed-gradient steps per linear")
    lr: float = Field(0.005, gt=0, description="signed-gradient step size (this project's addition)")
    enable_minmax_tuning: bool = True
    enable_round_tuning: bool = True
    strategies: list[AutoRoundStrategy] = Field(min_length=1)
