"""What `quantize` is asked and what it answers, and the two things a request settles before any check of the
model: its --model_type (given, or inferred from config.json) and the practice it runs (--config_path, a parsed
config, or the best practice for --quant_type)."""
from __future__ import annotations

import resource
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from msmodelslim.app.estimate_report import RunEstimate
from msmodelslim.app.practice import require_one_practice_source, select_practice
from msmodelslim.core.config import PracticeConfig, load_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.model.registry import AdapterEntry, adapter_class_of, infer_model_type, resolve


@dataclass
class QuantizeRequest:
    model_path: Path
    save_path: Path
    model_type: Optional[str]  # None: inferred from config.json's model_type (see with_model_type)
    device: DeviceSpec
    quant_type: Optional[str] = None
    config_path: Optional[Path] = None
    trust_remote_code: bool = False
    overwrite: bool = False
    dry_run: bool = False
    allow_default_practice: bool = False
    pipeline: Optional[PracticeConfig] = None  # a parsed config instead of config_path (the Python API)
    tags: tuple[str, ...] = ()  # --tag: scenarios a practice must be verified for (its verified_tags)
    resume: bool = False  # --resume: continue a killed run of this save_path from its last finished block
    estimate: bool = False  # with dry_run: measure one block and estimate the real run's RAM, disk and time
    started_at: Optional[float] = None  # time.time() when the command started (the CLI's), for the time estimate


@dataclass
class QuantizeReport:
    save_path: Path
    plan: dict[str, str]
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    warnings: list[str] = field(default_factory=list)
    description: dict = field(default_factory=dict)
    translated_config: Optional[str] = None  # a modelslim_v0 file's modelslim_v1 translation (YAML), else None
    estimate: Optional[RunEstimate] = None  # a dry run's estimates of the real run (QuantizeRequest.estimate)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_practice(request: QuantizeRequest, entry: Optional[AdapterEntry] = None) -> PracticeConfig:
    """The user's config, or the best practice for --model_type and --quant_type (no model loaded yet)."""
    require_one_practice_source(request.quant_type, request.config_path, request.pipeline)
    if request.pipeline is not None:
        return request.pipeline
    if request.config_path is not None:
        config = load_config(request.config_path)
        if not isinstance(config, PracticeConfig):  # multimodal_sd_modelslim_v1: the diffusion service's
            raise UnsupportedError(f"{request.config_path}: apiversion {config.apiversion} describes a diffusion "
                                   f"pipeline; run it with `msmodelslim quant` or msmodelslim.app.diffusion."
                                   f"quantize_diffusion(DiffusionQuantizeRequest(...)), not the text/VLM quantize()")
        return config
    entry = entry or resolve(request.model_type, request.model_path)
    vision_language = bool(getattr(adapter_class_of(entry, request.model_type), "is_vlm", False))
    return select_practice(request.model_type, entry.pedigree, request.quant_type, request.allow_default_practice,
                           tags=request.tags, vision_language=vision_language).config


def require_model_dir(model_path: Path) -> None:
    if not model_path.is_dir():
        raise InvalidModelError(f"--model_path {model_path} is not a directory")


def with_model_type(request: QuantizeRequest) -> QuantizeRequest:
    """The request with --model_type filled in from config.json when it was omitted (logged: name and why)."""
    if request.model_type is not None:
        return request
    require_model_dir(request.model_path)
    return replace(request, model_type=infer_model_type(request.model_path))
