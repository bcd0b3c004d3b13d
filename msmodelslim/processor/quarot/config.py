from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class QuaRotConfig(BaseModel):
    """`type: quarot`: offline random-Hadamard rotation of the residual stream and of the attention values; with
    online: true also the run-time rotations of o_proj's and (in the listed layers) down_proj's inputs (online.py)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["quarot"]
    online: bool = False
    block_size: int = Field(-1, description="-1 rotates the whole hidden size; a power of 2 rotates blocks")
    down_proj_online_layers: list[int] = Field(default_factory=list)
    max_tp_size: int = Field(4, description="online rotations stay inside each of up to this many tensor-parallel "
                                            "shards")
    export_extra_info: bool = Field(True, description="write optional/quarot.safetensors (the rotation)")
    seed: int = Field(0, ge=0, description="seed of the random Hadamard signs (this project's addition)")

    @model_validator(mode="after")
    def _online_layers_need_online(self) -> "QuaRotConfig":
        if self.down_proj_online_layers and not self.online:
            raise ValueError("down_proj_online_layers rotates down_proj's input at run time, which needs online: true")
        return self

    @field_validator("down_proj_online_layers")
    @classmethod
    def _layer_indices(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("must list distinct decoder layer indices (0, 1, ...)")
        return value

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value != -1 and not is_power_of_two(value):
            raise ValueError("must be -1 or a power of 2")
        return value

    @field_validator("max_tp_size")
    @classmethod
    def _tp(cls, value: int) -> int:
        if not is_power_of_two(value):
            raise ValueError("must be 1 or a power of 2")
        return value
