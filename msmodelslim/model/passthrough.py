"""Checkpoint tensors the model built from config.json does not read, and what becomes of each.

transformers builds `num_hidden_layers` decoder layers; a DeepSeek-V3-style checkpoint also holds its
multi-token-prediction (MTP) layer(s) at `model.layers.<num_hidden_layers + i>` (enorm, hnorm, eh_proj, a full
decoder layer with its experts, shared_head.norm/head, embed_tokens), which vLLM(-Ascend) loads from the same
checkpoint for speculative decoding (config.json `num_nextn_predict_layers`). Nothing of the input is dropped
silently: every such tensor is either

- passed through: written unchanged (its stored dtype; tagged FLOAT in ascendv1), grouped so that a processor
  that changes the residual stream can transform a group as a whole (`Processor.transform_passthrough`), or
- consumed, for a reason on the documented list below (`consumed_reason`), which the checker applies too.

Block-FP8 weights among the pass-through tensors are dequantized to the model dtype (their `_scale_inv` is then
consumed), as the model's own weights are; so are pack-quantized int4 ones (model/packed_checkpoint.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from msmodelslim.core.errors import InvalidModelError

MTP = "multi-token-prediction layer"
OTHER = "tensor(s) no module of the model reads"

FP8_SCALE_SUFFIX = "_scale_inv"
# safetensors dtypes a pass-through tensor may have: those the shard writer stores (float8 is dequantized first).
WRITABLE_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
FP8_STORED = {"F8_E4M3", "F8_E5M2"}


def consumed_reason(name: str, source_names: set[str]) -> Optional[str]:
    """Why input tensor `name` is, by design, in no output (the documented list, docs/ascendv1.md), else None."""
    if name.endswith(FP8_SCALE_SUFFIX) and name[: -len(FP8_SCALE_SUFFIX)] in source_names:
        return "block-FP8 scales, consumed when their weights were dequantized to the model dtype"
    if name.endswith(".scale") and name[: -len(".scale")] + ".weight" in source_names and "hc_head_fn" in source_names:
        return "DeepSeek-V4 FP8/FP4 scales, consumed when their weights were dequantized to the model dtype"
    if name.endswith("rotary_emb.inv_freq"):
        return "rotary inv_freq buffers, recomputed from config.json by every loader"
    return None


@dataclass(frozen=True)
class PassThroughGroup:
    """Related pass-through tensors: one MTP layer (`name` = its prefix, e.g. `model.layers.61`), or the
    tensors of one module prefix that the model lacks (kind OTHER)."""

    name: str
    kind: str  # MTP or OTHER
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class UnreadTensors:
    """What the run does with the checkpoint tensors the model does not read."""

    passthrough: tuple[PassThroughGroup, ...] = ()
    consumed: dict[str, str] = field(default_factory=dict)  # tensor name -> why it is not written

    @property
    def passthrough_names(self) -> list[str]:
        return [n for g in self.passthrough for n in g.tensors]

    def mtp_layers(self) -> list[PassThroughGroup]:
        return [g for g in self.passthrough if g.kind == MTP]


def _group_of(name: str, decoder_layers: str, num_hidden_layers: int) -> tuple[str, str]:
    """(group name, kind): layer `<decoder_layers>.<i>` with i >= num_hidden_layers and a top-level `mtp.`
    module (Qwen3-Next style) are MTP layers; anything else groups by its module prefix."""
    match = re.match(rf"^{re.escape(decoder_layers)}\.(\d+)\.", name)
    if match and int(match[1]) >= num_hidden_layers:
        return f"{decoder_layers}.{match[1]}", MTP
    if name.startswith("mtp."):
        return "mtp", MTP
    return name.rpartition(".")[0] or name, OTHER


def classify_unread(unread: Iterable[str], source_names: set[str], stored_dtype: dict[str, str],
                    decoder_layers: str, num_hidden_layers: int, where: str) -> UnreadTensors:
    """Sort the unread tensors into pass-through groups and consumed ones; refuse, by name and before any weight is
    read, a pass-through tensor the writers cannot store unchanged (`where` names the checkpoint directory)."""
    groups: dict[tuple[str, str], list[str]] = {}
    consumed: dict[str, str] = {}
    for name in sorted(unread):
        reason = consumed_reason(name, source_names)
        if reason is not None:
            consumed[name] = reason
            continue
        dtype = stored_dtype.get(name)  # None: a weight the checkpoint reader dequantizes (pack-quantized int4)
        if dtype in FP8_STORED and f"{name}{FP8_SCALE_SUFFIX}" not in source_names:
            raise InvalidModelError(f"{where}: {name} is float8 without its block scales ({name}{FP8_SCALE_SUFFIX}); "
                                    f"it cannot be dequantized. Convert the checkpoint to bfloat16 first")
        if dtype is not None and dtype not in WRITABLE_DTYPES | FP8_STORED:
            raise InvalidModelError(f"{where}: {name} is stored as {dtype}, which msmodelslim cannot write through "
                                    f"unchanged (it is not part of the model config.json describes); remove it from "
                                    f"the checkpoint or convert it to a float dtype")
        groups.setdefault(_group_of(name, decoder_layers, num_hidden_layers), []).append(name)
    passthrough = tuple(PassThroughGroup(g, kind, tuple(names)) for (g, kind), names in groups.items())
    return UnreadTensors(passthrough, consumed)
