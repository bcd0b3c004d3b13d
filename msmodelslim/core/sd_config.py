"""The `multimodal_sd_modelslim_v1` YAML protocol (diffusion transformers), parsed into validated, typed objects.

    apiversion: multimodal_sd_modelslim_v1
    spec:
      runner: layer_wise        # the only runner; any other value is warned about and replaced
      process: [{type: linear_quant, qconfig: {...}, include: ["*"]}]
      save: [{type: ascendv1_saver, part_file_size: 0}]   # or mindie_format_saver
      multimodal_sd_config:
        dump_config: {enable_dump: true, capture_mode: args, dump_data_dir: ""}
        inference_config: {prompt: "...", size: "832*480", frame_num: 81, sample_steps: 50}

`inference_config` is validated here only as a mapping: its keys belong to the model family's adapter
(model/diffusion/), which validates them before any weight is read. `model_config` is the established tool's
older name for the same block: accepted with a warning, never together with `inference_config`.

`spec.process` runs `linear_quant` (int8 and the MX types), `online_quarot` (processor/online_quarot/),
`fa3_quant` (processor/fa3_dit.py), and `iter_smooth` / `smooth_quant` (processor/smooth_dit.py, for the families
that describe their smoothing subgraphs) on the DiT's blocks. `spec.save` holds one saver: `ascendv1_saver` or
`mindie_format_saver` (the DiT's files of both formats would share the transformer/ folder). What this version does
not run is refused by name (core/roadmap.py): other processors, the `compressed_tensors` saver, `prior` stages.
`spec.dataset` (optional) names a prompt set (core/sd_dataset.py) whose texts are the calibration prompts, instead
of `inference_config.prompt`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.core.config_errors import refuse_bad_numbers, validated
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.roadmap import not_yet
from msmodelslim.core.saver_config import AscendV1SaverConfig, MindIESaverConfig
from msmodelslim.processor.registry import PROCESSORS
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.iter_smooth.config import IterSmoothConfig
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.online_quarot.config import OnlineQuaRotConfig
from msmodelslim.processor.smooth_quant.config import SmoothQuantConfig

API_VERSION = "multimodal_sd_modelslim_v1"
# what the diffusion service runs on the DiT's blocks (the smoothers where the family describes its subgraphs)
SD_PROCESSORS = ("linear_quant", "online_quarot", "fa3_quant", "iter_smooth", "smooth_quant")
SdProcessorConfig = Annotated[Union[LinearQuantConfig, OnlineQuaRotConfig, FA3QuantConfig, IterSmoothConfig,
                                    SmoothQuantConfig], Field(discriminator="type")]
SD_SAVERS = ("ascendv1_saver", "mindie_format_saver")

log = logging.getLogger("msmodelslim.core.sd_config")


class DumpConfig(BaseModel):
    """`multimodal_sd_config.dump_config`: where the captured DiT block inputs are kept (calib_data.pth)."""

    model_config = ConfigDict(extra="forbid")

    # False: data-free recipes skip sampling; calibrating ones capture in memory and write no file
    enable_dump: bool = True
    capture_mode: Literal["args"] = "args"  # the block's positional arguments (the only mode of the protocol)
    dump_data_dir: str = Field("", max_length=4096, description="'' means save_path")


class MultimodalSdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dump_config: DumpConfig = Field(default_factory=DumpConfig)
    inference_config: Optional[dict[str, Any]] = None
    # `model_config` is pydantic's own attribute name, so the YAML key is read through an alias.
    legacy_model_config: Optional[dict[str, Any]] = Field(None, alias="model_config")

    @model_validator(mode="after")
    def _one_inference_block(self) -> "MultimodalSdConfig":
        if self.inference_config is not None and self.legacy_model_config is not None:
            raise ValueError("inference_config and model_config (its deprecated name) cannot both be given; "
                             "keep inference_config")
        return self

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling settings as written (validated later by the family's adapter)."""
        return dict(self.inference_config or self.legacy_model_config or {})


SdSaverConfig = Annotated[Union[AscendV1SaverConfig, MindIESaverConfig], Field(discriminator="type")]


def _default_save() -> list[AscendV1SaverConfig]:
    return [AscendV1SaverConfig(type="ascendv1_saver")]


class SdSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runner: str = "layer_wise"
    process: list[SdProcessorConfig] = Field(default_factory=list)
    save: list[SdSaverConfig] = Field(default_factory=_default_save, min_length=1, max_length=1)
    multimodal_sd_config: MultimodalSdConfig = Field(default_factory=MultimodalSdConfig)
    # a prompt set (lab_calib/ folder name or index.jsonl path) replacing inference_config.prompt
    dataset: Optional[str] = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _no_gptaq(self) -> "SdSpec":
        for i, step in enumerate(self.process):
            weight = getattr(getattr(step, "qconfig", None), "weight", None)
            if weight is not None and weight.method == "gptq" and weight.option("gptaq_alpha") > 0:
                raise ValueError(f"process[{i}]: weight.ext.gptaq_alpha (GPTAQ) needs the float model's activations "
                                 f"carried beside the quantized ones, which only the modelslim_v1 block runner does "
                                 f"so far; the diffusion runner does not. Set gptaq_alpha to 0 (plain GPTQ)")
        return self


class SdPracticeConfig(BaseModel):
    """A parsed multimodal_sd_modelslim_v1 document."""

    model_config = ConfigDict(extra="allow")  # top-level anchor blocks, as in modelslim_v1

    apiversion: Literal["multimodal_sd_modelslim_v1"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: SdSpec
    source_dir: Optional[Path] = Field(default=None, exclude=True)


def _refuse_unsupported(spec: Any, source: str) -> None:
    """Processor and saver types, prior stages and a dataset this service does not run: refused by name,
    before pydantic would call them unknown."""
    if not isinstance(spec, dict):
        return
    for i, step in enumerate(spec.get("process") or []):
        kind = step.get("type") if isinstance(step, dict) else None
        if kind in SD_PROCESSORS or not isinstance(kind, str):
            continue
        planned = not_yet("processor", kind)
        if planned:
            raise UnsupportedError(f"{source}: spec.process[{i}].type: {planned}; {API_VERSION} runs "
                                   f"{', '.join(SD_PROCESSORS)}")
        if kind in PROCESSORS:
            raise UnsupportedError(f"{source}: spec.process[{i}].type: processor {kind!r} is not supported on "
                                   f"diffusion transformers yet (it belongs to the diffusion transformer work); "
                                   f"{API_VERSION} runs {', '.join(SD_PROCESSORS)}")
    savers = spec.get("save")
    if isinstance(savers, list) and len(savers) != 1:
        raise ConfigError(f"{source}: spec.save must hold exactly one saver for a diffusion pipeline (ascendv1_saver "
                          f"or mindie_format_saver: the DiT's files go into transformer/); run once per format")
    for i, saver in enumerate(savers or []):
        kind = saver.get("type") if isinstance(saver, dict) else None
        if kind in SD_SAVERS or not isinstance(kind, str):
            continue
        planned = not_yet("saver", kind)
        if planned:
            raise UnsupportedError(f"{source}: spec.save[{i}].type: {planned}; use ascendv1_saver")
        if kind == "compressed_tensors":
            raise UnsupportedError(f"{source}: spec.save[{i}].type: compressed_tensors is not available for "
                                   f"{API_VERSION} (as in the established tool); use ascendv1_saver")
    # a missing processor or saver is named before the fields this protocol does not read
    if spec.get("prior"):
        raise UnsupportedError(f"{source}: spec.prior is not supported by {API_VERSION} yet (prior stages run "
                               f"only for modelslim_v1); move its steps into spec.process")
    sd = spec.get("multimodal_sd_config")
    sampling = (sd.get("inference_config") or sd.get("model_config")) if isinstance(sd, dict) else None
    if spec.get("dataset") is not None and isinstance(sampling, dict) and "prompt" in sampling:
        raise ConfigError(f"{source}: spec.dataset and multimodal_sd_config.inference_config.prompt both give the "
                          f"calibration prompts; keep one")


def parse_sd_config(data: dict, source: str = "<config>") -> SdPracticeConfig:
    """Called by core/config.parse_config for `apiversion: multimodal_sd_modelslim_v1`."""
    refuse_bad_numbers(data, source)
    _refuse_unsupported(data.get("spec"), source)
    config = validated(SdPracticeConfig, data, source)
    runner = config.spec.runner
    if runner != "layer_wise":
        log.warning("%s: spec.runner %r is not available for diffusion transformers; using layer_wise (one DiT "
                    "block at a time)", source, runner)
        config.spec.runner = "layer_wise"
    if config.spec.multimodal_sd_config.legacy_model_config is not None:
        log.warning("%s: multimodal_sd_config.model_config is deprecated; rename it to inference_config", source)
    return config
