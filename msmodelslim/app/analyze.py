"""Use case: which layers are most sensitive to quantization (`msmodelslim analyze`, protocol.md §1.3, §7.1).

Scopes and metrics (defaults first):
  linear  kurtosis | std | quantile      statistics of each linear's calibration inputs (app/analysis_metrics.py);
                                          `patterns` (fnmatch over full linear names) selects the linears
  layer   mse_layer_wise | mse_model_wise per decoder block, float vs quantized: the mean MSE over the outputs of
                                          the block's linears (layer_wise), or the MSE of the final logits when
                                          only that block is quantized (model_wise: whole model in memory, one
                                          full forward per block and batch); `quant_modules` picks the linears
                                          quantized inside each block
  attn    mse                             per attention module, the MSE of its output float vs FA3 (int8 Q/K/V,
                                          one static scale per head; processor/fa3_quant)

The layer scope quantizes with the established tool's MXFP4 (activations and weights per block of 32, minmax)
unless `quant_type` (a best practice, as `quant --quant_type`) or `config_path` (a modelslim_v1 file) gives the
scheme the user will actually run: then each block's score is the error that scheme adds (smoothing included).

Everything that can be checked cheaply (scope, metric, paths, model type, data set, patterns against the model's
module names, the scheme) is checked before any weight is read.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.app.analysis_blocks import (compare_visit, linear_statistics_visit, model_wise_visit,
                                             walk_blocks)
from msmodelslim.app.analysis_metrics import LINEAR_METRICS, LINEAR_SCORES, InputStatistics
from msmodelslim.app.analysis_report import AnalysisResult, default_output, log_result, rank, write_outputs
from msmodelslim.app.practice import select_practice
from msmodelslim.core.config import FLOAT_TRANSFORMS, load_config
from msmodelslim.core.dataset import load_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.moe import routed_expert_linears
from msmodelslim.model.registry import create_adapter, resolve
from msmodelslim.processor.base import ProcessorContext, build_pipeline
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.matching import matches_any

log = get_logger("app.analyze")

SCOPE_METRICS = {"linear": LINEAR_METRICS, "layer": ("mse_layer_wise", "mse_model_wise"), "attn": ("mse",)}
DEFAULT_METRIC = {"linear": "kurtosis", "layer": "mse_layer_wise", "attn": "mse"}
DEFAULT_CALIB = "mix_calib.jsonl"
# The established tool's layer-scope scheme: MXFP4 activations and weights, per block of 32, minmax.
MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4_LABEL = "W4A4_MXFP4 (mxfp4 activations and weights per block of 32, minmax)"
# Steps a layer-scope scheme may not hold: the analysis compares one block's linear outputs, in isolation.
REFUSED_STEPS = {
    "quarot": "it rotates the whole model (embeddings and head too), so one block cannot be scored alone",
    "adapt_rotation": "it rotates the whole model (embeddings and head too), so one block cannot be scored alone",
    "dynamic_cache": "it quantizes the KV cache, not linears (score attention with 'analyze attn')",
    "kv_smooth": "it rescales K against the KV cache, not linears",
    "fa3_quant": "it quantizes attention Q/K/V, not linears (score it with 'analyze attn')",
}


@dataclass
class AnalyzeRequest:
    scope: str
    model_type: str
    model_path: Path
    device: DeviceSpec = DeviceSpec("cpu")
    calib_dataset: str = DEFAULT_CALIB
    topk: int = 15
    metric: Optional[str] = None  # None: the scope's default
    patterns: tuple[str, ...] = ("*",)  # linear scope
    quant_modules: tuple[str, ...] = ("*",)  # layer scope
    quant_type: Optional[str] = None  # layer scope: a best practice's scheme
    config_path: Optional[Path] = None  # layer scope: a modelslim_v1 file's scheme
    output: Optional[Path] = None  # None: ./msmodelslim_analysis/<model>-<scope>-<metric>
    trust_remote_code: bool = False
    allow_default_practice: bool = False


def check_arguments(request: AnalyzeRequest) -> str:
    """The metric to compute; ConfigError for an argument that cannot work (nothing read yet)."""
    if request.scope not in SCOPE_METRICS:
        raise ConfigError(f"analyze scope {request.scope!r} is unknown; use one of {', '.join(SCOPE_METRICS)}")
    metric = request.metric or DEFAULT_METRIC[request.scope]
    allowed = SCOPE_METRICS[request.scope]
    if metric not in allowed:
        owner = next((s for s, names in SCOPE_METRICS.items() if metric in names), None)
        hint = f" ({metric} belongs to 'analyze {owner}')" if owner else ""
        raise ConfigError(f"--metrics {metric!r} is not a metric of the {request.scope} scope{hint}; "
                          f"use one of {', '.join(allowed)}")
    if request.topk <= 0:
        raise ConfigError(f"--topk must be a positive integer, got {request.topk}")
    if (request.quant_type or request.config_path) and request.scope != "layer":
        what = "it measures float inputs" if request.scope == "linear" else "it uses FA3"
        raise ConfigError(f"--quant_type / --config_path choose the scheme of 'analyze layer'; the {request.scope} "
                          f"scope does not quantize linears ({what})")
    if request.quant_type and request.config_path:
        raise ConfigError("give at most one of --quant_type and --config_path")
    if request.scope != "linear" and tuple(request.patterns) != ("*",):
        raise ConfigError("--pattern filters the linear scope; for 'analyze layer' use --quant_modules")
    if request.scope != "layer" and tuple(request.quant_modules) != ("*",):
        raise ConfigError("--quant_modules applies to 'analyze layer' only")
    check_common_inputs(request)
    return metric


def check_common_inputs(request) -> None:
    """What every analyze scope (and `analyze mixed`) checks before anything is read: the calibration file's
    kind, one device, the model directory."""
    if not request.calib_dataset.endswith((".json", ".jsonl")):
        raise ConfigError(f"--calib_dataset {request.calib_dataset!r} must be a .json or .jsonl file (a name in "
                          f"lab_calib/ or a path)")
    if len(request.device.indices) > 1:
        raise ConfigError(f"--device {request.device}: analyze runs on one device (cpu, npu, npu:0, cuda:0)")
    if not request.model_path.is_dir():
        raise InvalidModelError(f"--model_path {request.model_path} is not a directory")


def _check_output(output: Path) -> None:
    """--output must be a directory or creatable as one (checked now: the analysis may take a while)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a directory")
    existing = next(p for p in [output, *output.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {existing} is not a writable directory")


def _steps(configs) -> list:
    return [s for c in configs for s in (_steps(c.configs) if c.type == "group" else [c])]


def _restricted(configs: list, kept_float: list[str]) -> list:
    """The scheme's steps with every quantization rule also excluding `kept_float` (full linear names): what
    --quant_modules leaves out stays float, while smoothing still sees the rules of the linears it quantizes."""
    out = []
    for c in configs:
        if c.type == "group":
            c = c.model_copy(update={"configs": _restricted(c.configs, kept_float)})
        elif c.type == "linear_quant":
            c = c.model_copy(update={"exclude": list(c.exclude) + kept_float})
        elif c.type == "autoround_quant":
            c = c.model_copy(update={"strategies": [s.model_copy(update={"exclude": list(s.exclude) + kept_float})
                                                    for s in c.strategies]})
        out.append(c)
    return out


def layer_scheme(request: AnalyzeRequest, pedigree: str) -> tuple[list, str]:
    """The layer scope's processor configs and a label naming the scheme."""
    if request.config_path is not None:
        config = load_config(request.config_path)
        steps, label = config.spec.process, f"config {request.config_path}"
    elif request.quant_type is not None:
        practice = select_practice(request.model_type, pedigree, request.quant_type, request.allow_default_practice)
        steps, label = practice.config.spec.process, f"{request.quant_type} ({practice.metadata.config_id})"
    else:
        steps = [LinearQuantConfig(type="linear_quant", qconfig={"act": MXFP4, "weight": MXFP4})]
        label = MXFP4_LABEL
    for step in _steps(steps):
        if step.type in REFUSED_STEPS:
            raise UnsupportedError(f"analyze layer cannot score a scheme with {step.type}: {REFUSED_STEPS[step.type]}; "
                                   f"use a scheme without it (--config_path) or the default MXFP4")
    if not any(s.type in ("linear_quant", "autoround_quant") for s in _steps(steps)):
        raise ConfigError(f"the scheme of {label} quantizes no linear, so analyze layer has nothing to score")
    return list(steps), label


def _linears(model: nn.Module, block_name: str) -> list[str]:
    return [f"{block_name}.{n}" for n, m in model.get_submodule(block_name).named_modules() if isinstance(m, nn.Linear)]


@dataclass
class _Plan:
    metric: str
    adapter: object
    skeleton: nn.Module
    block_names: list[str]
    texts: list[str]
    processors: list
    transforms: int  # the first `transforms` processors are float transforms (smoothing)
    scheme: str
    targets: dict[str, list[str]]  # block -> full names of the modules scored/quantized there


def refuse_vision_language(adapter: object, command: str) -> None:
    """Sensitivity analysis scores on texts; a vision-language adapter takes image samples (not supported yet)."""
    if getattr(adapter, "is_vlm", False):
        raise UnsupportedError(f"msmodelslim {command} works on text models; {type(adapter).__name__} is a "
                               f"vision-language model, which {command} does not support yet (it calibrates on "
                               f"texts). Quantize it with 'msmodelslim quant' and a multimodal_vlm_modelslim_v1 "
                               f"config (docs/vlm.md)")


def _prepare(request: AnalyzeRequest) -> _Plan:
    metric = check_arguments(request)
    entry = resolve(request.model_type, request.model_path)  # an unknown model type fails here
    steps, scheme = [], "float inputs"
    if request.scope == "layer":
        steps, scheme = layer_scheme(request, entry.pedigree)
    elif request.scope == "attn":
        steps, scheme = [FA3QuantConfig(type="fa3_quant")], "FA3 int8 Q/K/V, one static scale per head (minmax)"
    texts = load_texts(request.calib_dataset)  # a bad data set fails before the model is built
    adapter = create_adapter(request.model_type, str(request.model_path), request.trust_remote_code, entry)
    refuse_vision_language(adapter, "analyze")
    skeleton = adapter.init_skeleton()  # module names only, nothing read
    block_names = adapter.block_names(skeleton)
    targets = _targets(request, skeleton, block_names)
    if request.scope == "layer":
        kept_float = [n for b in block_names for n in _linears(skeleton, b) if n not in targets[b]]
        steps = _restricted(steps, kept_float)
        targets = {b: _scored_outputs(skeleton, b, names) for b, names in targets.items()}
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape(),
                               mla=adapter.mla_shape())
    processors = build_pipeline(steps, context)
    for processor in processors:
        processor.check_model(skeleton, block_names)
    if request.scope == "attn":
        targets = {b: [f"{b}.{processors[0].attention}"] for b in block_names}
    return _Plan(metric, adapter, skeleton, block_names, texts, processors, _leading_transforms(steps), scheme,
                 targets)


def _leading_transforms(steps: list) -> int:
    """How many of the first steps are float transforms (smoothing): the layer-wise reference includes them."""
    count = 0
    for step in steps:
        kinds = [s.type for s in _steps([step])]
        if all(k in FLOAT_TRANSFORMS for k in kinds):
            count += 1
        elif any(k in FLOAT_TRANSFORMS for k in kinds):
            raise UnsupportedError(f"analyze layer cannot split the group {kinds} into its float transform and its "
                                   f"quantization; write them as separate steps of spec.process")
        else:
            break
    return count


def _scored_outputs(skeleton: nn.Module, block_name: str, quantized: list[str]) -> list[str]:
    """The outputs compared in a block: its quantized linears, except routed experts, whose tokens depend on the
    router (the quantized block may route differently): their MoE module's output stands for them."""
    experts = routed_expert_linears(skeleton.get_submodule(block_name), block_name)
    moe = {experts[n][0].rpartition(".")[0] for n in quantized if n in experts}
    return [n for n in quantized if n not in experts] + sorted(moe)


def _targets(request: AnalyzeRequest, skeleton: nn.Module, block_names: list[str]) -> dict[str, list[str]]:
    """Per block, the linears --pattern (linear) or --quant_modules (layer) select; an empty selection is refused."""
    patterns = list(request.patterns if request.scope == "linear" else request.quant_modules)
    option = "--pattern" if request.scope == "linear" else "--quant_modules"
    selected = {b: [n for n in _linears(skeleton, b) if matches_any(n, patterns)] for b in block_names}
    if request.scope in ("linear", "layer") and not any(selected.values()):
        example = next((n for b in block_names for n in _linears(skeleton, b)), "?")
        raise ConfigError(f"{option} {patterns} selects no linear of the model's decoder blocks (fnmatch over full "
                          f"names, e.g. {example})")
    return selected


def analyze(request: AnalyzeRequest) -> AnalysisResult:
    started = time.perf_counter()
    plan = _prepare(request)
    metric, adapter = plan.metric, plan.adapter
    output = request.output or default_output(request.scope, metric, request.model_path)
    _check_output(output)  # before any weight is read
    device = request.device.primary
    model_wise = metric == "mse_model_wise"
    if model_wise:
        log.warning("mse_model_wise keeps the whole model in memory and runs one full forward per block and "
                    "calibration batch (%d blocks): use mse_layer_wise for large models", len(plan.block_names))
    model = adapter.load_weights(plan.skeleton, device, load_layers=model_wise)
    if model_wise and device.type != "cpu":
        model.to(device)
    adapter.enable_kv_cache(model, False)
    batches = adapter.handle_dataset(plan.texts, device)
    log.info("analyze %s --metrics %s: %d blocks, %d calibration batches (%s), %s", request.scope, metric,
             len(plan.block_names), len(batches), request.calib_dataset,
             "whole model resident" if model_wise else "one block in memory at a time")
    scores = _run(request, plan, model, batches, device, model_wise)
    patterns = list(request.patterns if request.scope == "linear" else request.quant_modules)
    result = AnalysisResult(request.scope, metric, plan.scheme, str(request.model_path), rank(scores), request.topk,
                            patterns)
    log_result(result)
    result.files = write_outputs(result, output)
    log.info("wrote %s in %.1f s", ", ".join(result.files.values()), time.perf_counter() - started)
    return result


def _run(request: AnalyzeRequest, plan: _Plan, model: nn.Module, batches: list, device: torch.device,
         model_wise: bool) -> dict[str, float]:
    scores: dict[str, float] = {}
    if request.scope == "linear":
        wanted = {n for names in plan.targets.values() for n in names}
        found: dict[str, InputStatistics] = {}
        visit = linear_statistics_visit(wanted.__contains__, plan.metric == "quantile", found)
        walk_blocks(plan.adapter, model, batches, device, True, visit)
        starved = [n for n, s in found.items() if s.count == 0]
        if starved:
            log.warning("%d linear(s) received no calibration input and are not ranked (e.g. %s)", len(starved),
                        starved[0])
        score = LINEAR_SCORES[plan.metric]
        return {n: score(s) for n, s in found.items() if s.count}
    if model_wise:
        visit = model_wise_visit(model, batches, plan.processors, scores)
        walk_blocks(plan.adapter, model, batches, device, False, visit)
        return scores
    per_module: Optional[dict[str, float]] = {} if request.scope == "attn" else None
    transforms, quantizers = plan.processors[: plan.transforms], plan.processors[plan.transforms :]
    visit = compare_visit(transforms, quantizers, lambda b, _block: plan.targets[b], scores, per_module)
    walk_blocks(plan.adapter, model, batches, device, True, visit)
    return per_module if per_module is not None else scores
