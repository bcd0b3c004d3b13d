"""`spec.save`: the savers a config may name, one pydantic model each, told apart by `type`."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_PART_FILE_SIZE_GB = 1_000_000  # a petabyte per shard: larger is a typo, and 1e308 would overflow byte counts
PartFileSizeGB = Annotated[float, Field(ge=0, le=MAX_PART_FILE_SIZE_GB,
                                        description="shard size in GB; 0 writes a single file")]


class AscendV1SaverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ascendv1_saver"]
    part_file_size: PartFileSizeGB = 4
    ext: dict[str, Any] = Field(default_factory=dict)


class CompressedTensorsSaverConfig(BaseModel):
    """`type: compressed_tensors`: Hugging Face shards + quantization_config (vLLM on GPUs, transformers)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["compressed_tensors"]
    part_file_size: PartFileSizeGB = 4


class MindIESaverConfig(BaseModel):
    """`type: mindie_format_saver`: the MindIE(-SD) layout (format/mindie.py): quant_model_description_<type>.json
    and quant_model_weight_<type>.safetensors, for the schemes that layout holds."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["mindie_format_saver"]
    part_file_size: PartFileSizeGB = 4
    ext: dict[str, Any] = Field(default_factory=dict)


SaverConfig = Annotated[Union[AscendV1SaverConfig, CompressedTensorsSaverConfig, MindIESaverConfig],
                        Field(discriminator="type")]
SAVER_TYPES = ("ascendv1_saver", "compressed_tensors", "mindie_format_saver")
