"""Checks of a written compressed-tensors directory against formats.md C.2 (errors) and what vLLM's GPU
kernels accept (B.6, warnings)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from compressed_tensors.quantization import QuantizationConfig
from pydantic import ValidationError
from safetensors import safe_open

from msmodelslim.format.compressed_tensors.kv_cache import SUFFIXES as KV_SUFFIXES
from msmodelslim.format.compressed_tensors.kv_cache import is_vllm_fp8_cache
from msmodelslim.format.compressed_tensors.tensors import (FLOAT_QUANTIZED, INT_QUANTIZED, MXFP4_PACK_QUANTIZED,
                                                           MXFP8_QUANTIZED, NVFP4_PACK_QUANTIZED, PACK_QUANTIZED)
from msmodelslim.format.findings import Finding
from msmodelslim.format.integrity import read_checked_tensors
from msmodelslim.model.rebuild import same_name

SUFFIXES = {INT_QUANTIZED: ("weight", "weight_scale"), FLOAT_QUANTIZED: ("weight", "weight_scale"),
            PACK_QUANTIZED: ("weight_packed", "weight_scale", "weight_shape"),
            NVFP4_PACK_QUANTIZED: ("weight_packed", "weight_scale", "weight_global_scale"),
            MXFP4_PACK_QUANTIZED: ("weight_packed", "weight_scale"), MXFP8_QUANTIZED: ("weight", "weight_scale")}

# Keys of quantization_config that QuantizationConfig does not model (the writer's bookkeeping).
UNMODELLED_KEYS = ("version", "sparsity_config", "transform_config")
EXPERT = re.compile(r"\.experts\.\d+\.")
# transformers 5.24's loader treats every 8-bit float experts group as per-channel FP8
# (integrations/compressed_tensors.py:98-115): it multiplies the float8 codes [N, K] by the stored E8M0 bytes
# [N, K/32] as they are, with neither 2^(byte - 127) nor the expansion to blocks of 32, and fails on the shapes.
# Dense MXFP8 layers and MXFP4 experts load in transformers to exactly our weights
# (tests/test_compressed_tensors_mx.py).
TRANSFORMERS_MXFP8_EXPERTS = ("its compressed-tensors integration multiplies the float8 codes by the raw E8M0 "
                              "scale bytes without expanding the blocks of 32 (transformers 5.24, "
                              "integrations/compressed_tensors.py:115) and fails to load them")


def is_compressed_tensors(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def missing_target_tensors(names: set[str], config: QuantizationConfig, loader_name: Callable[[str], str] = same_name
                           ) -> list[tuple[str, str, str, list[str]]]:
    """(group, target, its on-disk name, missing suffixes) for each exact-name target whose tensors are not all in
    `names`. Targets name modules as transformers loads them; `loader_name` maps an on-disk module name to that name
    (the tensors of a published layout keep their own names). Class names and `re:` patterns match modules of a
    built model, not names, so they are not checked here."""
    on_disk = {loader_name(prefix): prefix for prefix in {name.rpartition(".")[0] for name in names}}
    found = []
    for group_name, group in config.config_groups.items():
        for target in group.targets:
            if target.startswith("re:") or "." not in target:
                continue
            stored = on_disk.get(target, target)
            missing = [s for s in SUFFIXES[group.format or config.format] if f"{stored}.{s}" not in names]
            if missing:
                found.append((group_name, target, stored, missing))
    return found


def named_target(target: str, stored: str) -> str:
    return target if stored == target else f"{target} (stored as {stored})"


def check_compressed_tensors(path: Path, loader_name: Callable[[str], str] = same_name) -> list[Finding]:
    """`loader_name`: on-disk module name -> the name transformers loads it under (model/rebuild.py
    loader_module_names), which the targets use."""
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    names = set(read_checked_tensors(path, err, keep=False))
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return findings + [Finding("error", f"config.json is missing or not JSON: {exc}")]
    raw = config.get("quantization_config")
    if raw is None:
        return findings + [Finding("warning", "C.2.1: nothing was quantized, so config.json has no quantization_config")]
    try:
        parsed = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k not in UNMODELLED_KEYS})
    except ValidationError as exc:
        return findings + [Finding("error", f"C.2.1: quantization_config does not validate: {exc.errors()[0]['msg']}")]
    findings += kv_cache_findings(path, names, parsed.kv_cache_scheme)
    if "lm_head" not in parsed.ignore and "lm_head.weight" in names:
        findings.append(Finding("error", "C.2.5: lm_head is not in ignore"))
    for group, target, stored, missing in missing_target_tensors(names, parsed, loader_name):
        findings.append(Finding("error", f"C.2.3: {named_target(target, stored)} ({group}) lacks {', '.join(missing)}"))
    for group, scheme in parsed.config_groups.items():
        w, act = scheme.weights, scheme.input_activations
        if act is not None and not w.symmetric:
            findings.append(Finding("warning", f"B.6: {group}: vLLM accepts asymmetric weights only for weight-only "
                                               f"(pack-quantized) layers"))
        if act is not None and w.type == "int" and w.num_bits == 8 and w.strategy == "group":
            findings.append(Finding("warning", f"B.6: {group}: vLLM's W8A8 int8 kernels take per-channel weights, "
                                               f"not groups"))
        experts = [t for t in scheme.targets if EXPERT.search(t)]
        if scheme.format == MXFP8_QUANTIZED and experts:
            findings.append(Finding("warning", f"B.6: {group}: transformers cannot load MXFP8 MoE experts "
                                               f"({experts[0]}, ...): {TRANSFORMERS_MXFP8_EXPERTS}"))
    return findings


def _kv_scales(path: Path) -> dict[str, torch.Tensor]:
    scales: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            scales.update({k: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[2] in KV_SUFFIXES})
    return scales


def kv_cache_findings(path: Path, names: set[str], scheme) -> list[Finding]:
    """C.2.7: the FP8 KV cache vLLM loads (kv_cache_scheme fp8 / tensor / symmetric, `<attn>.k_scale` and
    `.v_scale` of shape [1], positive) on every attention that has a k_proj; scales without a scheme are unread."""
    stray = sorted(n for n in names if n.rpartition(".")[2] in KV_SUFFIXES)
    if scheme is None:
        return [Finding("error", f"C.2.7: {stray[0]} is saved but config.json has no kv_cache_scheme: vLLM would "
                                 f"not read it")] if stray else []
    findings = []
    if not is_vllm_fp8_cache(scheme):
        findings.append(Finding("error", f"C.2.7: kv_cache_scheme is {scheme.type} {scheme.num_bits}-bit, strategy "
                                         f"{scheme.strategy}, symmetric {scheme.symmetric}; vLLM loads only float "
                                         f"8-bit, strategy tensor, symmetric"))
    attentions = sorted({n.split(".k_proj.")[0] for n in names if ".k_proj." in n})
    scales = _kv_scales(path)
    if not scales:
        return findings + [Finding("error", "C.2.7: kv_cache_scheme is set but no <attn>.k_scale/v_scale is saved")]
    for attention in attentions or sorted({n.rpartition(".")[0] for n in scales}):
        for suffix in KV_SUFFIXES:
            tensor = scales.get(f"{attention}.{suffix}")
            if tensor is None:
                findings.append(Finding("error", f"C.2.7: {attention}.{suffix} is missing"))
            elif tuple(tensor.shape) != (1,) or not bool((tensor.float() > 0).all()):
                findings.append(Finding("error", f"C.2.7: {attention}.{suffix} must be one positive value, shape "
                                                 f"[1]; it is {tuple(tensor.shape)} {tensor.flatten()[:4].tolist()}"))
    return findings
