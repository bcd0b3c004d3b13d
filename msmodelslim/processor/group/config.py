from typing import Literal

from pydantic import BaseModel, ConfigDict


class GroupConfig(BaseModel):
    """`type: group`: several processors that share one calibration forward per block."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["group"]
    configs: list["ProcessorConfig"]  # noqa: F821 - resolved in processor.registry
