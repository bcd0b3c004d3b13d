"""ascendv1 reader: rebuild a runnable model from the files alone (no state shared with the writer).

Quantized linears become `QuantLinear`s whose forward reproduces the serving kernels' arithmetic; every other
tensor is loaded as saved. Used by `msmodelslim eval` and by the round-trip tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.ascendv1.tensors import FLOAT, linear_from_tensors
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.model.moe import unfuse_experts

GLOBAL_KEYS = {"version", "model_quant_type", "metadata", "group_size", "optional", "kv_cache_type",
               "kv_quant_type", "fa_quant_type", "reduce_quant_type"}


def read_description(path: Path) -> dict:
    file = path / DESCRIPTION
    if not file.is_file():
        raise InvalidModelError(f"{path} is not an ascendv1 checkpoint: {DESCRIPTION} is missing")
    return json.loads(file.read_text(encoding="utf-8"))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def quantized_layers(description: dict) -> dict[str, str]:
    """{linear prefix: type} for every quantized linear (keyed by its `.weight` / `.weight_packed` entry)."""
    layers = {}
    for key, tag in description.items():
        if key in GLOBAL_KEYS or tag == FLOAT:
            continue
        for suffix in (".weight", ".weight_packed"):
            if key.endswith(suffix):
                layers[key[: -len(suffix)]] = tag
    return layers


def tensors_by_layer(tensors: dict[str, torch.Tensor], prefixes) -> dict[str, dict[str, torch.Tensor]]:
    """{layer prefix: {suffix: tensor}} for the given prefixes, in one pass over the tensor names."""
    grouped: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if prefix in grouped:
            grouped[prefix][suffix] = tensor
    return grouped


def load_ascendv1(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    description = read_description(path)
    tensors = read_tensors(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.eval()
    unfuse_experts(model)  # ascendv1 stores one tensor set per expert (formats.md A.5)
    consumed: set[str] = set()
    layers = quantized_layers(description)
    for prefix, own in tensors_by_layer(tensors, layers).items():
        tag = layers[prefix]
        consumed.update(f"{prefix}.{k}" for k in own)
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear_from_tensors(tag, own))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if k not in consumed}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in layers]
    if result.unexpected_keys or missing:
        raise InvalidModelError(
            f"{path}: tensors do not match the model architecture "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        model.tie_weights()
    return model
