"""The Python API for users who script: the same use cases as the command line, with the same checks, the same
errors (`msmodelslim.core.errors.MsModelSlimError` subclasses, each with a message saying what to do) and the
same atomic output.

    from msmodelslim.api import quantize, evaluate

    report = quantize("SmolLM2-135M-Instruct", "SmolLM2-w8a8", model_type="SmolLM2-135M-Instruct", quant_type="w8a8")
    print(report.description["model_quant_type"], report.seconds)
    scores = evaluate("SmolLM2-135M-Instruct", "SmolLM2-w8a8", dataset="prose_eval.txt", max_windows=8)
    print(scores["quantized"].perplexity / scores["float"].perplexity)

`config` takes a YAML path or the same pipeline as a dict (`{"apiversion": "modelslim_v1", "spec": {...}}`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from msmodelslim.app.evaluate import PerplexityResult
from msmodelslim.app.evaluate import evaluate as _evaluate
from msmodelslim.app.quantize import quantize as _quantize
from msmodelslim.app.quantize_request import QuantizeReport, QuantizeRequest
from msmodelslim.core.config import PracticeConfig, parse_config
from msmodelslim.core.device import parse_device

PathLike = Union[str, Path]


def quantize(model_path: PathLike, save_path: PathLike, *, model_type: Optional[str] = None,
             quant_type: Optional[str] = None, config: Union[PathLike, dict, None] = None, device: str = "cpu",
             overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False,
             allow_default_practice: bool = False, estimate: bool = False) -> QuantizeReport:
    """Quantize `model_path` into `save_path` with `quant_type` (the best practice for the model) or `config`.

    `model_type` may be left out when config.json names a registered family. Returns the plan
    ({linear: scheme}), the written description, the warnings, the time and the peak memory. With `dry_run`
    and `estimate`, `report.estimate` holds the real run's estimated peak RSS, disk and time (app/estimate.py)."""
    config_path, pipeline = (None, None) if config is None else (
        (None, _pipeline(config)) if isinstance(config, dict) else (Path(config), None))
    request = QuantizeRequest(model_path=Path(model_path), save_path=Path(save_path), model_type=model_type,
                              device=parse_device(device), quant_type=quant_type, config_path=config_path,
                              pipeline=pipeline, trust_remote_code=trust_remote_code, overwrite=overwrite,
                              dry_run=dry_run, allow_default_practice=allow_default_practice, estimate=estimate)
    return _quantize(request)


def evaluate(model_path: PathLike, quant_path: PathLike, dataset: str = "prose_eval.txt", *, device: str = "cpu",
             window: int = 512, max_windows: int = 40, trust_remote_code: bool = False) -> dict[str, PerplexityResult]:
    """Perplexity of the float model and of the ascendv1 checkpoint read back from disk, on the same windows:
    {"float": ..., "quantized": ...}, each with .perplexity, .windows, .tokens and .seconds."""
    return _evaluate(Path(model_path), Path(quant_path), dataset, parse_device(device).primary, window, max_windows,
                     trust_remote_code)


def _pipeline(data: dict[str, Any]) -> PracticeConfig:
    config = parse_config(data, "config")
    config.source_dir = Path.cwd()  # relative dataset paths are read from the working directory
    return config
