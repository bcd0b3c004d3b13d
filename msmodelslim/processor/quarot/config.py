from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class QuaRotConfig(BaseModel):
    """`type: quarot`: offline random-Hadamard rotation of the residual stream and of the attention values."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["quarot"]
    online: bool = False
    block_size: int = Field(-1, description="-1 rotates the whole hidden size; a power of 2 rotates blocks")
    down_proj_online_layers: list[int] = Field(default_factory=list)
    max_tp_size: int = Field(4, description="only used by online rotations")
    export_extra_info: bool = Field(True, description="write optional/quarot.safetensors (the rotation)")
    seed: int = Field(0, ge=0, description="seed of the random Hadamard signs (this project's addition)")

    @field_validator("online")
    @classmethod
    def _offline_only(cls, value: bool) -> bool:
        if value:
            raise ValueError("online: true is not implemented: online rotations need kernels that vLLM-Ascend "
                             "does not run; use the offline rotation (online: false)")
        return value

    @field_validator("down_proj_online_layers")
    @classmethod
    def _no_online_layers(cls, value: list[int]) -> list[int]:
        if value:
            raise ValueError("down_proj_online_layers needs online rotations, which are not implemented")
        return value

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value != -1 and not _power_of_two(value):
            raise ValueError("must be -1 or a power of 2")
        return value

    @field_validator("max_tp_size")
    @classmethod
    def _tp(cls, value: int) -> int:
        if not _power_of_two(value):
            raise ValueError("must be 1 or a power of 2")
        return value
