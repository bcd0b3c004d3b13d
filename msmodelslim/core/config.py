"""The `modelslim_v1` YAML protocol, parsed into validated, typed objects.

    apiversion: modelslim_v1
    spec:
      runner: auto            # auto | model_wise | layer_wise | dp_layer_wise
      process: [...]          # processors, run in order (see processor/registry.py)
      save: [{type: ascendv1_saver, part_file_size: 4}]
      dataset: mix_calib.jsonl

`apiversion: multimodal_vlm_modelslim_v1` (vision-language models) is the same protocol with image calibration
data: `spec.dataset` names images (core/vlm_dataset.py; default the built-in `calibImages`), `spec.default_text` is
the prompt of images that come without one, and the runner is always layer_wise.

Every error names the offending field by its path, e.g.
`spec.process[1].qconfig.act.scope: 'per_tokn' is not one of per_tensor, per_token, per_channel, per_group`.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializerFunctionWrapHandler,
                      field_validator, model_serializer, model_validator)

from msmodelslim.core.calibration import EarlyStop, ReducedPrecision
from msmodelslim.core.config_errors import format_validation_error, refuse_bad_numbers, validated
from msmodelslim.core.device import has_native_bfloat16
from msmodelslim.core.errors import ConfigError, MsModelSlimError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.prior import PriorStage, check_stages
from msmodelslim.core.roadmap import not_yet
from msmodelslim.core.saver_config import AscendV1SaverConfig, SaverConfig
from msmodelslim.core.v0 import Translation, translate_document
from msmodelslim.core.yaml_reader import read_yaml_file
from msmodelslim.processor.registry import ProcessorConfig

VLM_APIVERSION = "multimodal_vlm_modelslim_v1"
SUPPORTED_APIVERSIONS = ("modelslim_v1", "modelslim_v0", VLM_APIVERSION)  # v0 files are translated (core/v0.py)
# The established tool's defaults for VLM configs (its one-command guide, multimodal_vlm_modelslim_v1 section).
DEFAULT_VLM_TEXT = "Describe this image in detail."
# Its field default is the text set mix_calib.jsonl, which no image dataset form can read; every VLM practice there
# names calibImages, so that is the default here (a config without a dataset calibrates on images, not fails).
DEFAULT_VLM_DATASET = "calibImages"

log = get_logger("config")


class RunnerType(str, enum.Enum):
    auto = "auto"
    model_wise = "model_wise"
    layer_wise = "layer_wise"
    dp_layer_wise = "dp_layer_wise"


# Processors that rewrite float weights (exactly, in float) and so must see them before quantization.
FLOAT_TRANSFORMS = ("smooth_quant", "iter_smooth", "flex_smooth_quant", "flex_awq_ssz", "awq", "quarot", "kv_smooth",
                    "svd_res", "adapt_rotation")


# Steps that replace linears, or fix KV-cache ranges that a later change of V or K would invalidate.
QUANTIZERS = ("linear_quant", "autoround_quant", "float_sparse", "dynamic_cache", "fa3_quant")


CALIBRATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CalibrationConfig(BaseModel):
    """`spec.calibration`: when a calibration forward may stop before the end of the calibration set.

    A forward whose statistics are running extremes (smoothing's max |x|, static min/max ranges) stops after at
    least `min_tokens` tokens once no linear input's per-channel min or max moved by more than `rtol` times that
    linear's largest channel max |x| over the last `window_tokens` tokens; the blocks after it are calibrated on the batches it
    forwarded (core/calibration.py). `early_stop: false` uses every batch.

    `precision: bfloat16` runs those same range-only forwards under bfloat16 autocast (faster matmuls, extremes of
    bfloat16-rounded activations); every other calibration forward stays float32 (core/calibration.py). `auto`
    is bfloat16 where the device multiplies bfloat16 in hardware and a step collects only ranges, float32
    elsewhere; the run resolves it before any weight is read (`resolved`) and records what it chose. The default
    stays float32: bfloat16's rounding compounds over the blocks, and on one CPU it cost a static W8A8 run 0.8 %
    of perplexity (docs/config.md).

    `next_block_inputs: quantized` feeds each block the previous block's outputs after it was quantized (GPTQ's
    original sequential order, and llm-compressor's): the later blocks then calibrate on the inputs they will
    see when served, at the cost of one more forward per block."""

    model_config = ConfigDict(extra="forbid")

    early_stop: bool = True
    # A running extreme moves by at most 2x the channel's magnitude, so rtol 2 stops at min_tokens.
    rtol: float = Field(0.05, gt=0, le=2, description="largest relative move of a channel's range still 'converged'")
    window_tokens: int = Field(8192, ge=1, le=10**9, description="tokens over which the ranges must stay within rtol")
    min_tokens: int = Field(16384, ge=1, le=10**12, description="never stop before this many tokens")
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="dtype of the matmuls of range-only calibration forwards; auto: bfloat16 where the "
                               "device has bfloat16 matmul units, else float32 (core/calibration.py)")
    next_block_inputs: Literal["float", "quantized"] = Field(
        "float", description="what the next block calibrates on: this block's float outputs, or its outputs once "
                             "quantized (one more forward per block; core/runner.py)")
    _precision_chosen: bool = PrivateAttr(default=False)  # resolved from auto: its declines are not news to the user

    def early_stop_rule(self) -> Optional[EarlyStop]:
        return EarlyStop(self.rtol, self.window_tokens, self.min_tokens) if self.early_stop else None

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The saved practice (`*_best_practice.yaml`, the resume fingerprint) of a run with the defaults stays
        # byte-identical to one written before these fields existed. A run records what it resolved `auto` to:
        # the same practice computes in another dtype on another machine.
        data = handler(self)
        if self.precision == "float32":
            data.pop("precision", None)
        if self.next_block_inputs == "float":
            data.pop("next_block_inputs", None)
        return data

    def resolved(self, device: torch.device, ranges_only_step: bool) -> "CalibrationConfig":
        """This config with `auto` settled for `device`: bfloat16 where it multiplies bfloat16 in hardware and
        some step's forward collects only ranges (`ranges_only_step`; no other forward would use it), else
        float32. An explicit precision is kept as written."""
        if self.precision != "auto":
            return self
        fast = ranges_only_step and has_native_bfloat16(device)
        settled = self.model_copy(update={"precision": "bfloat16" if fast else "float32"})
        settled._precision_chosen = True
        return settled

    def reduced_precision(self) -> Optional[ReducedPrecision]:
        """None for float32 (calibration forwards as the model computes); a fresh one per run otherwise."""
        if self.precision == "auto":
            raise ValueError("spec.calibration.precision auto must be resolved for the run's device first")
        if self.precision == "float32":
            return None
        return ReducedPrecision(CALIBRATION_DTYPES[self.precision], chosen=self._precision_chosen)


def _default_save() -> list[AscendV1SaverConfig]:
    return [AscendV1SaverConfig(type="ascendv1_saver")]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runner: RunnerType = RunnerType.auto
    prior: list[PriorStage] = Field(default_factory=list)
    process: list[ProcessorConfig] = Field(default_factory=list)
    save: list[SaverConfig] = Field(default_factory=_default_save)
    dataset: str = Field("mix_calib.jsonl", max_length=4096)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _prior_stages(self) -> "Spec":
        check_stages(self.prior, self.process)
        return self

    @model_validator(mode="after")
    def _transforms_before_quantization(self) -> "Spec":
        """Smoothing rewrites float weights, so it must run before the layers are quantized."""
        quantized_at = split_at = None
        for i, step in enumerate(self.process):
            kinds = [c.type for c in step.configs] if step.type == "group" else [step.type]
            transforms = [k for k in kinds if k in FLOAT_TRANSFORMS]
            # svd_res's pair (W = R + l2·l1) is split from the weight as it is then: a later rewrite of the
            # weight (smoothing, rotation, a second split) would change R alone and break the sum
            for kind in kinds:
                if kind in FLOAT_TRANSFORMS and kind != "svd_res" and split_at is not None:
                    raise ValueError(f"process[{i}] ({kind}) comes after svd_res (process[{split_at}]); svd_res must "
                                     f"be the last float transform before quantization: put {kind} before it")
                if kind == "svd_res" and split_at is None:
                    split_at = i
            if transforms and quantized_at is not None:
                raise ValueError(f"process[{i}] ({transforms[0]}) comes after process[{quantized_at}] "
                                 f"({self.process[quantized_at].type}); float transforms (smoothing, rotation) must come before quantization")
            ranged = [k for k in ("dynamic_cache", "fa3_quant") if k in kinds]
            if transforms and ranged:  # one shared forward: ranges taken before the transform
                raise ValueError(f"process[{i}] (group) holds {transforms[0]} and {ranged[0]}: they share one "
                                 f"calibration forward, so the attention ranges would be those before "
                                 f"{transforms[0]} changes Q, K and V; put {transforms[0]} in an earlier step")
            if any(k in QUANTIZERS for k in kinds) and quantized_at is None:
                quantized_at = i
        return self

    @model_validator(mode="after")
    def _gptaq_needs_quantized_inputs(self) -> "Spec":
        """GPTAQ fits the quantized model, fed what it will be served, to the float one: without the quantized
        model's activations there is no difference to correct."""
        if self.calibration.next_block_inputs == "quantized":
            return self
        for i, step in enumerate(self.process):
            for config in (step.configs if step.type == "group" else [step]):
                weight = getattr(getattr(config, "qconfig", None), "weight", None)
                if weight is not None and weight.method == "gptq" and weight.option("gptaq_alpha") > 0:
                    raise ValueError(f"process[{i}] ({step.type}) sets weight.ext.gptaq_alpha: GPTAQ fits each layer "
                                     f"fed the quantized model's activations to the float model's output, so it "
                                     f"needs spec.calibration.next_block_inputs: quantized; add it, or set "
                                     f"gptaq_alpha to 0 for plain GPTQ")
        return self


class VlmSpec(Spec):
    """`multimodal_vlm_modelslim_v1`'s spec: modelslim_v1's processors and savers, image calibration data, and the
    prompt that images without their own are calibrated with."""

    # Only layer_wise: the vision tower is one block (read whole), the text decoder loaded one layer at a time.
    runner: RunnerType = RunnerType.layer_wise
    dataset: str = Field(DEFAULT_VLM_DATASET, max_length=4096)
    default_text: str = Field(DEFAULT_VLM_TEXT, max_length=4096)

    @field_validator("runner")
    @classmethod
    def _always_layer_wise(cls, runner: RunnerType) -> RunnerType:
        # as the established tool does: warned and replaced, not refused (its practices may name another runner)
        if runner != RunnerType.layer_wise:
            log.warning("spec.runner %s: a multimodal_vlm_modelslim_v1 run is always layer_wise (the vision tower "
                        "as one block, the text decoder one layer at a time); running layer_wise", runner.value)
        return RunnerType.layer_wise

    @field_validator("default_text")
    @classmethod
    def _a_real_prompt(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must be a non-empty prompt (it is the text of every image given without one); "
                             f"leave it out for {DEFAULT_VLM_TEXT!r}")
        return text


class PracticeConfig(BaseModel):
    # Extra top-level keys are allowed: that is where YAML anchor blocks live.
    model_config = ConfigDict(extra="allow")

    apiversion: Literal["modelslim_v1"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: Spec
    source_dir: Optional[Path] = Field(default=None, exclude=True)
    # Set when the file was `apiversion: modelslim_v0`: the v1 document it became and a note per mapped key.
    _translation: Optional[Translation] = PrivateAttr(default=None)

    @property
    def translation(self) -> Optional[Translation]:
        return self._translation

    @property
    def is_vlm(self) -> bool:
        """A vision-language run: image calibration samples (core/vlm_dataset.py) instead of texts."""
        return self.apiversion == VLM_APIVERSION


class VlmPracticeConfig(PracticeConfig):
    """`apiversion: multimodal_vlm_modelslim_v1`."""

    apiversion: Literal["multimodal_vlm_modelslim_v1"]
    spec: VlmSpec


def _format_error(err: dict) -> str:
    if err["type"] == "extra_forbidden" and tuple(err["loc"]) == ("spec", "default_text"):
        return (f"spec.default_text: a field of apiversion {VLM_APIVERSION} (vision-language models, image "
                f"calibration); this config is modelslim_v1")
    return format_validation_error(err)


def parse_config(data: Any, source: str = "<config>") -> PracticeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'apiversion' and 'spec'")
    api = data.get("apiversion")
    if api == "multimodal_sd_modelslim_v1":  # diffusion transformers: their own spec (core/sd_config.py)
        from msmodelslim.core.sd_config import parse_sd_config
        return parse_sd_config(data, source)
    if api == "modelslim_convert":  # its own protocol and use case (core/convert_config.py, app/convert_weights.py)
        raise ConfigError(f"{source}: apiversion modelslim_convert converts weights offline; run it as "
                          f"'msmodelslim quant --model_path M --save_path S --config_path <this file>'")
    if api not in SUPPORTED_APIVERSIONS:
        planned = not_yet("apiversion", api)
        if planned:
            raise ConfigError(f"{source}: {planned}; supported: {', '.join(SUPPORTED_APIVERSIONS)}")
        raise ConfigError(f"{source}: apiversion {api!r} is unknown; supported: {', '.join(SUPPORTED_APIVERSIONS)}")
    refuse_bad_numbers(data, source)
    translation = None
    if api == "modelslim_v0":
        try:
            translation = translate_document(data)
        except MsModelSlimError as exc:
            raise type(exc)(f"{source}: {exc}") from None
        data = translation.document
    config = validated(VlmPracticeConfig if api == VLM_APIVERSION else PracticeConfig, data, source, _format_error,
                       " (in its modelslim_v1 translation)" if translation else "")
    config._translation = translation
    # Quoted numbers ("inf", "nan") pass the walk above as strings and become floats only in pydantic.
    refuse_bad_numbers(config.model_dump(exclude={"source_dir"}), source)
    return config


def load_config(path: str | Path) -> PracticeConfig:
    path = Path(path)
    data = read_yaml_file(path, f"config file {str(path)!r} does not exist or is not a file", str(path))
    config = parse_config(data, str(path))
    config.source_dir = path.resolve().parent
    return config
