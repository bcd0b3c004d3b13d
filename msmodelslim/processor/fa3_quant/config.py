"""`type: fa3_quant` settings: one `qconfig` for Q, K and V, or `details` {fa_q, fa_k, fa_v} (protocol.md §2.4).

Implemented: int8 `per_head` symmetric minmax (static: one scale per head, calibrated); and the dynamic branches,
which calibrate nothing and write only the per-attention `quant_type` string: int8 `per_token`, fp8_e4m3
`per_token`, mxfp8 / mxfp4 `per_block` (blocks of 32 along head_dim, E8M0 shared scale). Branches may differ in
dtype and scope (Q fp8 per_token, K/V mxfp4 per_block) as long as all three are dynamic, or all three static.
Static FP8 (fp8_e4m3 per_head) and the other float formats are refused by name while the config is read, before
any weight is.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msmodelslim.core.logging import get_logger
from msmodelslim.core.roadmap import FLOAT_FORMATS
from msmodelslim.processor.matching import Pattern

log = get_logger("fa3_quant")

SCOPES = {"per_head": "static: one int8 scale per head, calibrated with minmax",
          "per_token": "dynamic: the kernel quantizes each token (int8 or fp8_e4m3); only the quant_type string "
                       "is written",
          "per_block": "dynamic: the kernel quantizes blocks of 32 along head_dim (mxfp8, mxfp4); only the "
                       "quant_type string is written"}
# dtype -> the scopes it is implemented with
DTYPE_SCOPES = {"int8": ("per_head", "per_token"), "fp8_e4m3": ("per_token",), "mxfp8": ("per_block",),
                "mxfp4": ("per_block",)}
PLANNED_DTYPES = ("hifloat8", "fp8", "float8")  # float formats the established tool names that FA3 lacks


class FA3QConfig(BaseModel):
    """How one of Q, K, V is quantized for the attention kernel."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = "int8"
    scope: str = "per_head"
    symmetric: bool = True
    method: str = "minmax"
    ext: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype in PLANNED_DTYPES:
            raise ValueError(f"FA3 dtype {dtype!r} is not implemented yet (it belongs to {FLOAT_FORMATS}); FA3 "
                             f"quantizes Q/K/V to {', '.join(DTYPE_SCOPES)}")
        if dtype not in DTYPE_SCOPES:
            raise ValueError(f"FA3 dtype {dtype!r} is not an attention quantization type; use one of "
                             f"{', '.join(DTYPE_SCOPES)}")
        return dtype

    @field_validator("scope")
    @classmethod
    def _scope(cls, scope: str) -> str:
        if scope == "dual_scale":
            raise ValueError(f"FA3 scope {scope!r} (MXFP4 with a second per-block scale) is not implemented yet (it "
                             f"belongs to {FLOAT_FORMATS}); MX attention quantization takes scope per_block")
        if scope not in SCOPES:
            raise ValueError(f"FA3 scope {scope!r} is not one of {', '.join(SCOPES)} "
                             f"({'; '.join(f'{k}: {v}' for k, v in SCOPES.items())})")
        return scope

    @model_validator(mode="after")
    def _check(self) -> "FA3QConfig":
        if self.dtype == "fp8_e4m3" and self.scope == "per_head":
            raise ValueError(f"FA3 static FP8 (dtype 'fp8_e4m3', scope 'per_head': calibrated per-head FP8 scales) is "
                             f"not implemented yet (it belongs to {FLOAT_FORMATS}); fp8_e4m3 runs with scope "
                             f"per_token (dynamic)")
        if self.scope not in DTYPE_SCOPES[self.dtype]:
            raise ValueError(f"FA3 dtype {self.dtype!r} does not go with scope {self.scope!r}: "
                             + "; ".join(f"{d} takes {' or '.join(s)}" for d, s in DTYPE_SCOPES.items()))
        if not self.symmetric:
            raise ValueError("FA3 symmetric: false is refused: the attention kernel dequantizes Q/K/V with the scale "
                             "alone (the offset is saved as zeros, formats.md A.6); use symmetric: true")
        if self.method != "minmax":
            raise ValueError(f"FA3 method {self.method!r} is not implemented; use minmax")
        if self.ext:
            log.warning("fa3_quant ext key(s) %s are not used (minmax has no options) and are ignored", sorted(self.ext))
        return self

    @property
    def static(self) -> bool:
        return self.scope == "per_head"


class FA3Details(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fa_q: FA3QConfig = Field(default_factory=FA3QConfig)
    fa_k: FA3QConfig = Field(default_factory=FA3QConfig)
    fa_v: FA3QConfig = Field(default_factory=FA3QConfig)


class FA3QuantConfig(BaseModel):
    """`type: fa3_quant`: Q, K and V of the selected attention modules quantized for the attention kernel."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["fa3_quant"]
    qconfig: Optional[FA3QConfig] = None
    details: Optional[FA3Details] = None
    include: list[Pattern] = Field(default_factory=lambda: ["*"])  # attention modules
    exclude: list[Pattern] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_of(self) -> "FA3QuantConfig":
        if self.qconfig is not None and self.details is not None:
            raise ValueError("give qconfig (one setting for Q, K and V) or details {fa_q, fa_k, fa_v}, not both")
        kinds = {q.static for q in self.branches.values()}
        if len(kinds) > 1:
            scopes = sorted({q.scope for q in self.branches.values()})
            raise ValueError(f"details mixes FA3 scopes {scopes}: a layer is either static (per_head scales saved "
                             f"for fa_q, fa_k and fa_v) or dynamic (per_token / per_block, nothing saved); give all "
                             f"three branches a static scope or all three a dynamic one")
        return self

    @property
    def static(self) -> bool:
        """per_head: calibrated scales are saved; per_token / per_block: only the quant_type string."""
        return next(iter(self.branches.values())).static

    @property
    def branches(self) -> dict[str, FA3QConfig]:
        """{fa_q, fa_k, fa_v: setting}, the default int8 per_head when neither field is given."""
        if self.details is not None:
            return {"fa_q": self.details.fa_q, "fa_k": self.details.fa_k, "fa_v": self.details.fa_v}
        q = self.qconfig or FA3QConfig()
        return {"fa_q": q, "fa_k": q, "fa_v": q}
