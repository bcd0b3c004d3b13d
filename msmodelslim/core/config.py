"""The `modelslim_v1` YAML protocol, parsed into validated, typed objects.

    apiversion: modelslim_v1
    spec:
      runner: auto            # auto | model_wise | layer_wise | dp_layer_wise
      process: [...]          # processors, run in order (see processor/registry.py)
      save: [{type: ascendv1_saver, part_file_size: 4}]
      dataset: mix_calib.jsonl

Every error names the offending field by its path, e.g.
`spec.process[1].qconfig.act.scope: 'per_tokn' is not one of per_tensor, per_token, per_channel, per_group`.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msmodelslim.core.errors import ConfigError
from msmodelslim.processor.registry import PLANNED_PROCESSORS, PROCESSORS, ProcessorConfig

SUPPORTED_APIVERSIONS = ("modelslim_v1",)
KNOWN_APIVERSIONS = ("modelslim_v0", "multimodal_vlm_modelslim_v1", "multimodal_sd_modelslim_v1", "modelslim_convert")


class RunnerType(str, enum.Enum):
    auto = "auto"
    model_wise = "model_wise"
    layer_wise = "layer_wise"
    dp_layer_wise = "dp_layer_wise"


class AscendV1SaverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ascendv1_saver"]
    part_file_size: float = Field(4, ge=0, description="shard size in GB; 0 writes a single file")
    ext: dict[str, Any] = Field(default_factory=dict)


class CompressedTensorsSaverConfig(BaseModel):
    """`type: compressed_tensors`: Hugging Face shards + quantization_config (vLLM on GPUs, transformers)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["compressed_tensors"]
    part_file_size: float = Field(4, ge=0, description="shard size in GB; 0 writes a single file")


SaverConfig = Annotated[Union[AscendV1SaverConfig, CompressedTensorsSaverConfig], Field(discriminator="type")]


# Processors that rewrite float weights (exactly, in float) and so must see them before quantization.
FLOAT_TRANSFORMS = ("smooth_quant", "iter_smooth", "flex_smooth_quant", "flex_awq_ssz", "awq", "quarot")


QUANTIZERS = ("linear_quant", "autoround_quant")


def _default_save() -> list[AscendV1SaverConfig]:
    return [AscendV1SaverConfig(type="ascendv1_saver")]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runner: RunnerType = RunnerType.auto
    process: list[ProcessorConfig] = Field(default_factory=list)
    save: list[SaverConfig] = Field(default_factory=_default_save)
    dataset: str = Field("mix_calib.jsonl", max_length=4096)

    @model_validator(mode="after")
    def _transforms_before_quantization(self) -> "Spec":
        """Smoothing rewrites float weights, so it must run before the layers are quantized."""
        quantized_at = None
        for i, step in enumerate(self.process):
            kinds = [c.type for c in step.configs] if step.type == "group" else [step.type]
            transforms = [k for k in kinds if k in FLOAT_TRANSFORMS]
            if transforms and quantized_at is not None:
                raise ValueError(f"process[{i}] ({transforms[0]}) comes after process[{quantized_at}] "
                                 f"({self.process[quantized_at].type}); float transforms (smoothing, rotation) must come before quantization")
            if any(k in QUANTIZERS for k in kinds) and quantized_at is None:
                quantized_at = i
        return self


class PracticeConfig(BaseModel):
    # Extra top-level keys are allowed: that is where YAML anchor blocks live.
    model_config = ConfigDict(extra="allow")

    apiversion: Literal["modelslim_v1"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: Spec
    source_dir: Optional[Path] = Field(default=None, exclude=True)


def _format_loc(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in PROCESSORS and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag pydantic inserts after a list index
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _format_error(err: dict) -> str:
    where = _format_loc(err["loc"]) or "<top level>"
    kind, value = err["type"], err.get("input")
    if kind == "enum":
        allowed = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{where}: {value!r} is not one of {allowed}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; expected {err['ctx']['expected']}"
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see docs for the allowed fields)"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        if tag in PLANNED_PROCESSORS:
            return f"{where}.type: processor {tag!r} is not implemented yet; available: {', '.join(PROCESSORS)}"
        return f"{where}.type: unknown processor type {tag!r}; available: {', '.join(PROCESSORS)}"
    if kind == "union_tag_not_found":
        return f"{where}: missing 'type' (one of {', '.join(PROCESSORS)})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def parse_config(data: Any, source: str = "<config>") -> PracticeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'apiversion' and 'spec'")
    api = data.get("apiversion")
    if api not in SUPPORTED_APIVERSIONS:
        if api in KNOWN_APIVERSIONS:
            raise ConfigError(f"{source}: apiversion {api!r} is not supported yet; supported: {', '.join(SUPPORTED_APIVERSIONS)}")
        raise ConfigError(f"{source}: apiversion {api!r} is unknown; supported: {', '.join(SUPPORTED_APIVERSIONS)}")
    try:
        config = PracticeConfig.model_validate(data)
    except ValidationError as exc:
        lines = "\n  ".join(_format_error(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}") from None
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silent override is almost always a mistake)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    # Only keys written in this mapping count; keys merged in with `<<: *anchor` may be overridden.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | Path) -> PracticeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    config = parse_config(data, str(path))
    config.source_dir = path.resolve().parent
    return config
