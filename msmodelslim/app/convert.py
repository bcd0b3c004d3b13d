"""Use case: convert an ascendv1 checkpoint (or a MindIE one: the same tensors) into compressed-tensors, so a model
quantized for Ascend NPUs can be served by vLLM on GPUs (or loaded by transformers).

The ascendv1 directory is read by our reader (formats.md C.3) into QuantLinear modules, which the
compressed-tensors writer stores as if they had just been quantized; the integer codes and scales are carried
over unchanged. The whole model is held in memory (a per-layer streaming conversion is future work); FLOAT
tensors outside the architecture (a multi-token-prediction layer that quant passed through) are copied one at a
time, unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from msmodelslim.core.saver_config import MAX_PART_FILE_SIZE_GB
from msmodelslim.core.errors import ConfigError, FormatCheckError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.reader import (
    description_file,
    load_ascendv1,
    mindie_descriptions,
    other_layout_hint,
    outside_architecture,
    read_valid_description,
    require_described_tensors,
)
from msmodelslim.format.ascendv1.tensors import split_flat_tag, split_svd_tag
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors
from msmodelslim.format.compressed_tensors.writer import CompressedTensorsWriter
from msmodelslim.format.disk_space import check_free_space, estimate_output_bytes
from msmodelslim.format.integrity import required_tensors, verify_complete, verify_source_tensors
from msmodelslim.format.read_back import empty_model
from msmodelslim.format.staging import check_save_path, staged_directory
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.model.checkpoint import SafetensorsCheckpoint
from msmodelslim.model.hf_config import load_hf_config, require_local_dir
from msmodelslim.model.transformers_model import config_dtype

log = get_logger("app.convert")


def _drop_folded_zero_biases(model: nn.Module, skeleton: nn.Module, source: Path) -> None:
    """ascendv1 W8A8 always stores a (folded) bias; where the architecture (`skeleton`, the model the reader built,
    names and all) has none it reads back as zeros and must not be written as a tensor the architecture does not
    expect."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.bias is not None:
            if getattr(skeleton.get_submodule(name), "bias", None) is None:
                if module.bias.abs().max() > 0:
                    raise InvalidModelError(f"{source}: {name} has a non-zero bias but the architecture has none")
                module.bias = None


def convert_ascendv1_to_compressed_tensors(source: Path, save_path: Path, overwrite: bool = False,
                                           part_file_size_gb: float = 4, trust_remote_code: bool = False) -> list[str]:
    """Write `save_path` from the ascendv1 checkpoint `source`; returns the checker's warnings."""
    if not math.isfinite(part_file_size_gb) or not 0 <= part_file_size_gb <= MAX_PART_FILE_SIZE_GB:
        raise ConfigError(f"--part_file_size {part_file_size_gb}: expected a number of GB from 0 to "
                          f"{MAX_PART_FILE_SIZE_GB}")
    source = require_local_dir(source, "--model_path")
    # ascendv1's description, or a MindIE one (format/mindie.py: the same entries and tensors)
    described = (source / DESCRIPTION).is_file() or len(mindie_descriptions(source)) == 1
    if not described or not (source / "config.json").is_file():
        raise InvalidModelError(f"{source} is not an ascendv1 checkpoint, nor a MindIE one (needs {DESCRIPTION} or "
                                f"one quant_model_description_<type>.json, and config.json){other_layout_hint(source)}")
    # a malformed description, or a shard it names missing, fails before anything is loaded or written
    description = read_valid_description(source)
    require_described_tensors(source, description, "--model_path")
    tags = {tag for tag in description.values() if isinstance(tag, str)}
    unsupported = sorted(tags & CompressedTensorsWriter.UNSUPPORTED.keys())  # e.g. W8A8_MIX (PD-mix), W8A8S
    if unsupported:
        tag = unsupported[0]
        raise UnsupportedError(f"{source} holds {tag} layers: {CompressedTensorsWriter.UNSUPPORTED[tag]}")
    lowrank = sorted(tag for tag in tags if split_svd_tag(tag)[1])
    if lowrank:  # SVDQuant (svd_res): the low-rank pair has nowhere to go
        raise UnsupportedError(f"{source} holds {lowrank[0]} layers (a quantized residual plus svd_lowrank_l1/l2): "
                               f"{CompressedTensorsWriter.UNSUPPORTED_STEPS['svd_res']}")
    flat = sorted(tag for tag in tags if split_flat_tag(tag)[1])
    if flat:  # FlatQuant: the run-time transform has nowhere to go
        raise UnsupportedError(f"{source} holds {flat[0]} layers (a run-time transform left_trans/right_trans and "
                               f"clip_ratio): {CompressedTensorsWriter.UNSUPPORTED_STEPS['flatquant']}")
    quarot = (description.get("metadata") or {}).get("quarot") if isinstance(description.get("metadata"), dict) else None
    if quarot:  # online rotations: compressed-tensors has no tensors for them
        raise UnsupportedError(f"{source} rotates layer inputs online (description metadata.quarot): "
                               f"{CompressedTensorsWriter.UNSUPPORTED_ONLINE_ROTATION}")
    if "C8" in description.values():
        raise UnsupportedError(f"{source} holds an int8 KV cache (C8, kv_cache_type {description.get('kv_cache_type')!r}); "
                               f"compressed-tensors has no int8 per-channel KV cache (vLLM reads only FP8 "
                               f"per-tensor k_scale/v_scale); quantize again without dynamic_cache")
    config = load_hf_config(source, trust_remote_code)
    check_save_path(save_path, overwrite, source)
    # the codes and scales are carried over: the output is about the source's size (stat() only, nothing read)
    check_free_space(save_path, estimate_output_bytes(source), overwrite)
    dtype = config_dtype(config)
    model = load_ascendv1(source, trust_remote_code)
    rebuilt = empty_model(source, trust_remote_code)
    _drop_folded_zero_biases(model, rebuilt.model, source)
    checkpoint = SafetensorsCheckpoint(source)
    # FLOAT tensors the architecture has no module for (e.g. a multi-token-prediction layer): carried over as they are
    extra = outside_architecture(model, description, checkpoint.names())
    float_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    with staged_directory(save_path, overwrite) as staging:
        loaded_name = rebuilt.loaded_name  # targets use the names transformers loads
        writer = CompressedTensorsWriter(staging, part_file_size_gb, dtype, lambda _name: dtype, loaded_name)
        for name, child in model.named_children():
            writer.add_module_tree(name, child)
        for name in extra:  # one tensor in memory at a time
            writer.add_passthrough(name, checkpoint.load([name])[name])
        writer.finish(source, float_linears=float_linears)
        # copied with the other *.json files; not part of this format
        (staging / description_file(source).name).unlink(missing_ok=True)
        findings = check_compressed_tensors(staging, loaded_name)
        errors = [f.message for f in findings if f.level == "error"]
        if errors:
            raise FormatCheckError("the converted checkpoint fails the compressed-tensors checklist:\n  " + "\n  ".join(errors))
        verify_complete(staging, required_tensors(model, (), CompressedTensorsWriter.TIED_ALIASES))
        verify_source_tensors(staging, checkpoint.names(), source)
    warnings = [f.message for f in findings if f.level == "warning"]
    for warning in warnings:
        log.warning("format check: %s", warning)
    log.info("converted %s -> %s (compressed-tensors)", source, save_path)
    return warnings
