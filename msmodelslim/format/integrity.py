"""Integrity of written checkpoints, any format.

Every writer's last check before its output is moved into place: the files on disk hold every tensor the
model needs. The expectation comes from the model's structure (the input checkpoint's tensors as the model
loads them, quantized linears replaced by their quantized tensors), the evidence from the written safetensors
headers alone, so a writer that silently dropped a tensor cannot pass its own check. A second check compares
the output's tensor set with the input checkpoint's (`unaccounted_source_tensors`), so that nothing of the input
(e.g. a multi-token-prediction layer the model does not read) vanishes without a documented reason; `msmodelslim
check --model_path` runs it on any written checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from msmodelslim.core.errors import FormatCheckError
from msmodelslim.format.ascendv1.tensors import decode_deq_scale
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.model.moe import stacked_per_projection_source, stacked_source
from msmodelslim.model.passthrough import consumed_reason
from msmodelslim.quantizer.primitives import all_finite

# A quantized linear is present when one of these holds its codes (int8 / int4-in-int8 / packed int32).
QUANTIZED_WEIGHT = ("weight", "weight_packed")


def required_tensors(model: nn.Module, quantized: Iterable[str], tied_aliases: bool) -> list[tuple[str, ...]]:
    """One tuple of acceptable names per tensor the output must hold.

    `quantized`: linears planned as quantized (on a float skeleton); QuantLinear modules count as quantized too.
    `tied_aliases`: whether the format stores a tied table (lm_head sharing the embedding) under both names.
    """
    quantized = set(quantized)
    required: list[tuple[str, ...]] = []
    seen: set[int] = set()
    skip_under: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        if name in quantized or isinstance(module, QuantLinear):
            skip_under.append(name)
            required.append(tuple(f"{name}.{s}" for s in QUANTIZED_WEIGHT))
            if getattr(module, "bias", None) is not None:
                required.append((f"{name}.bias",))
            continue
        own = list(module.named_parameters(recurse=False)) + [
            (b, t) for b, t in module.named_buffers(recurse=False)
            if t is not None and b not in module._non_persistent_buffers_set
        ]
        for local, tensor in own:
            alias = id(tensor) in seen  # tied parameters are one object under two names
            seen.add(id(tensor))
            if alias and not tied_aliases:
                continue
            required.append((f"{name}.{local}" if name else local,))
    return required


def written_tensor_names(out_dir: Path) -> set[str]:
    """Tensor names in the safetensors files of `out_dir` (top level), read from the headers only."""
    names: set[str] = set()
    for shard in sorted(out_dir.glob("*.safetensors")):
        with open(shard, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        names.update(k for k in header if k != "__metadata__")
    return names


def verify_complete(out_dir: Path, required: list[tuple[str, ...]]) -> None:
    """Raise FormatCheckError naming the tensors the written output lacks."""
    present = written_tensor_names(out_dir)
    missing = [alternatives[0] for alternatives in required if not any(n in present for n in alternatives)]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FormatCheckError(
            f"the written checkpoint lacks {len(missing)} tensor(s) the model needs ({shown}); it was not moved "
            f"into place. This is a bug in msmodelslim: please report it with MSMODELSLIM_LOG_LEVEL=debug output"
        )


# ---- the input's tensors, all accounted for -------------------------------------------------------------------
QUANTIZED_SCALE = ("weight_scale", "deq_scale")  # with QUANTIZED_WEIGHT: a linear written in a quantized layout


def _quantized_linears(present: set[str]) -> set[str]:
    """Prefixes the output holds as a quantized linear: codes (`weight`/`weight_packed`) next to a scale."""
    found = set()
    for name in present:
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANTIZED_SCALE and any(f"{prefix}.{w}" in present for w in QUANTIZED_WEIGHT):
            found.add(prefix)
    return found


def _stacked_tensors_written(present: set[str]) -> set[str]:
    """Stacked expert tensors of the layouts the adapters read (model/moe.py: transformers' `experts.gate_up_proj`
    [E, 2I, H] / `experts.down_proj`, or one stacked tensor per projection) whose experts `present` holds one
    tensor set each (formats.md A.5), quantized or not."""
    covered = set()
    for name in present:
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANTIZED_WEIGHT:
            for locate in (stacked_source, stacked_per_projection_source):
                where = locate(f"{prefix}.weight")
                if where is not None:
                    covered.add(where.tensor)
    return covered


def _ties_embeddings(out_dir: Path) -> bool:
    """Whether the output's config.json ties lm_head to the embedding (then a format may store the table once);
    a config that does not say gets its model type's default."""
    try:
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    config = config if isinstance(config, dict) else {}
    for part in (config, config.get("text_config")):
        if isinstance(part, dict) and "tie_word_embeddings" in part:
            return part["tie_word_embeddings"] is True
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.for_model(config.get("model_type")), "tie_word_embeddings", False) is True
    except (ValueError, TypeError, KeyError):
        return False


def unaccounted_source_tensors(source_names: Iterable[str], out_dir: Path) -> list[str]:
    """The input checkpoint's tensors that the output in `out_dir` lacks: each must be there as itself, or as the
    quantized tensor set of its linear (weight -> weight + scales, aux tensors converted, a bias kept or folded
    into `quant_bias`), or as per-expert weights (a stacked expert tensor), or be on the documented list of
    consumed tensors (`model.passthrough.consumed_reason`: block-FP8 scales, rotary inv_freq), or be a tied
    lm_head that the format stores once. Reads the output's safetensors headers only."""
    source = set(source_names)
    present = written_tensor_names(out_dir)
    quantized = _quantized_linears(present)
    per_expert = _stacked_tensors_written(present)
    tied = None
    missing = []
    for name in sorted(source - present):
        prefix, _, suffix = name.rpartition(".")
        folded = f"{prefix}.quant_bias"
        if prefix in quantized and (suffix != "bias" or folded in present or folded in source):
            continue  # a bias survives as itself, or folded into a static W8A8 layer's int32 quant_bias
        if name in per_expert:
            continue
        if consumed_reason(name, source) is not None:
            continue
        if name.endswith("lm_head.weight"):
            tied = _ties_embeddings(out_dir) if tied is None else tied
            if tied and any(n.endswith("embed_tokens.weight") for n in present):
                continue
        missing.append(name)
    return missing


def verify_source_tensors(out_dir: Path, source_names: Iterable[str], source: Path) -> None:
    """Raise FormatCheckError naming the input tensors the written output does not account for."""
    missing = unaccounted_source_tensors(source_names, out_dir)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FormatCheckError(
            f"the written checkpoint lacks {len(missing)} tensor(s) of {source} ({shown}), neither written nor "
            f"consumed for a documented reason; it was not moved into place. This is a bug in msmodelslim: "
            f"please report it with MSMODELSLIM_LOG_LEVEL=debug output"
        )


def _non_finite(name: str, tensor: torch.Tensor) -> bool:
    return not all_finite(decode_deq_scale(tensor) if name.endswith(".deq_scale") else tensor)


def read_checked_tensors(path: Path, err: Callable[[str], None], keep: bool = True) -> dict[str, torch.Tensor | None]:
    """{name: tensor} of the top-level *.safetensors files (values None unless `keep`: only one tensor is held
    at a time then). Unreadable files, names in two files and NaN/Inf values (in float tensors, and in
    deq_scale's int64-encoded floats) are reported through `err`."""
    tensors: dict[str, torch.Tensor | None] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        err(f"tensor {key} appears in two files")
                    tensor = f.get_tensor(key)
                    if _non_finite(key, tensor):
                        err(f"{key} holds NaN or Inf values")
                    tensors[key] = tensor if keep else None
        except Exception as exc:  # truncated, garbage or foreign: the loader would fail the same way
            err(f"{file.name} is not a readable safetensors file ({type(exc).__name__}: {exc})")
    return tensors
