from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from msmodelslim.processor.quarot.config import QuaRotConfig, is_power_of_two

STAGE_1_KEYS = ("steps", "quant_dtype", "layer_type", "max_samples")
STAGE_2_KEYS = ("online", "down_proj_online_layers", "max_tp_size")
# block_size and seed belong to both stages


class AdaptRotationConfig(BaseModel):
    """`type: adapt_rotation`, in two stages (processor/adapt_rotation/processor.py).

    stage 1 (in spec.prior): learn the residual stream's rotation from calibration activations (`steps`
    iterations, per-token `quant_dtype` error of the inputs of the linears named by `layer_type`, at most
    `max_samples` tokens per layer). stage 2 (in spec.process): QuaRot with that rotation instead of the random
    Hadamard one (`online`, `down_proj_online_layers`, `max_tp_size` as quarot's). The keys of one stage are
    refused in the other."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["adapt_rotation"]
    stage: Literal[1, 2]
    block_size: int = Field(-1, description="-1 rotates the whole hidden size; a power of 2 rotates blocks")
    seed: int = Field(0, ge=0, description="seed of the starting Hadamard's random signs (this project's addition)")
    # stage 1
    steps: Optional[int] = Field(None, ge=1, le=1000, description="stage 1: iterations (default 20)")
    quant_dtype: Optional[Literal["int4", "int8"]] = Field(None, description="stage 1: activation dtype (default int4)")
    layer_type: Optional[list[str]] = Field(None, description="stage 1: name parts of the linears whose inputs are "
                                                              "collected (default ['up_proj'])")
    max_samples: Optional[int] = Field(None, ge=1, le=100000, description="stage 1: tokens kept per layer "
                                                                          "(default 2048)")
    # stage 2
    online: Optional[bool] = Field(None, description="stage 2: as quarot's (default false)")
    down_proj_online_layers: Optional[list[int]] = Field(None, description="stage 2: as quarot's (default [])")
    max_tp_size: Optional[int] = Field(None, ge=1, le=64, description="stage 2: as quarot's (default 4)")

    @model_validator(mode="before")
    @classmethod
    def _keys_of_the_other_stage(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stage") in (1, 2):
            other = STAGE_2_KEYS if data["stage"] == 1 else STAGE_1_KEYS
            wrong = [k for k in other if data.get(k) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} belong(s) to adapt_rotation stage {3 - data['stage']}, not to "
                                 f"stage {data['stage']}")
        return data

    @model_validator(mode="after")
    def _defaults_of_the_stage(self) -> "AdaptRotationConfig":
        if self.stage == 1:
            self.steps = 20 if self.steps is None else self.steps
            self.quant_dtype = self.quant_dtype or "int4"
            self.layer_type = ["up_proj"] if self.layer_type is None else self.layer_type
            self.max_samples = 2048 if self.max_samples is None else self.max_samples
            if not self.layer_type or not all(isinstance(t, str) and t.strip() for t in self.layer_type):
                raise ValueError("layer_type must list at least one non-empty linear name part, e.g. ['up_proj']")
        else:  # quarot's own checks of these settings, its messages named by field
            try:
                quarot = self.quarot_config()
            except ValidationError as exc:
                raise ValueError("; ".join(" ".join([*map(str, e["loc"]), e["msg"].removeprefix("Value error, ")])
                                           for e in exc.errors())) from None
            self.online, self.max_tp_size = quarot.online, quarot.max_tp_size
            self.down_proj_online_layers = quarot.down_proj_online_layers
        return self

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value != -1 and not is_power_of_two(value):
            raise ValueError("block_size must be -1 or a power of 2")
        return value

    def quarot_config(self) -> QuaRotConfig:
        """Stage 2 as the quarot step it is: the learned rotation aside, every setting is quarot's."""
        return QuaRotConfig(type="quarot", online=bool(self.online), block_size=self.block_size,
                            down_proj_online_layers=list(self.down_proj_online_layers or []),
                            max_tp_size=4 if self.max_tp_size is None else self.max_tp_size, seed=self.seed)

    @property
    def bits(self) -> int:
        return 4 if self.quant_dtype == "int4" else 8
