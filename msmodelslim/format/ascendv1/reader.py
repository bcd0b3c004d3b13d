"""ascendv1 reader: rebuild a runnable model from the files alone (no state shared with the writer).

Quantized linears become `QuantLinear`s whose forward reproduces the serving kernels' arithmetic; every other
tensor is loaded as saved. Used by `msmodelslim eval` and by the round-trip tests.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.fa3 import (FA_QUANT, STATIC_TOKEN, dynamic_fa3_branches, fa3_by_attention,
                                             fa3_from_tensors, fa3_quant_types)
from msmodelslim.format.ascendv1.kv_cache import C8, kv_cache_by_attention, kv_cache_from_tensors
from msmodelslim.format.ascendv1.tensors import (FLAT_INNER_TAGS, FLOAT, REQUIRED_SUFFIXES, TAG_ALIASES, flat_tag,
                                                linear_from_tensors, svd_tag)
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.read_back import empty_model, load_float_tensors, read_tensors, tensor_names
from msmodelslim.format.staging import incomplete_reason
from msmodelslim.ir.sparse_linear import W16A16S
from msmodelslim.model.checkpoint import read_json
from msmodelslim.ir.fa3 import FA3HeadQuant
from msmodelslim.ir.kv_cache import KVCacheQuant
from msmodelslim.model.fa3 import install_fa3, mla_layout
from msmodelslim.model.hf_config import require_local_dir
from msmodelslim.model.kv_cache import cache_argument, install_kv_cache_quant
from msmodelslim.model.skeleton_edits import has_module
from msmodelslim.quantizer.scheme import Scheme

log = get_logger("format.ascendv1.reader")

GLOBAL_KEYS = {"version", "model_quant_type", "metadata", "group_size", "optional", "kv_cache_type",
               "kv_quant_type", "fa_quant_type", "reduce_quant_type", "indexer_quant_type", "max_supported_tp"}


def attention_entry(key: str) -> bool:
    """`<attn>.quant_type` / `<attn>.indexer.quant_type`: an attention layer's quantization type (formats.md A.2,
    A.6), an entry that names no tensor."""
    return key.endswith(".quant_type")


def mindie_descriptions(folder: Path) -> list[Path]:
    """The MindIE descriptions in `folder` (format/mindie.py: `quant_model_description_<type>.json`, one per
    output)."""
    return sorted(folder.glob(f"{DESCRIPTION.removesuffix('.json')}_*.json"))


def description_file(path: Path) -> Path:
    """ascendv1's quant_model_description.json, else the folder's one MindIE description
    (quant_model_description_<type>.json, format/mindie.py: the same entries, the same tensors)."""
    file = path / DESCRIPTION
    if file.is_file():
        return file
    found = mindie_descriptions(path)
    if len(found) == 1:
        return found[0]
    if found:
        raise InvalidModelError(f"{path} holds {len(found)} MindIE descriptions ({', '.join(f.name for f in found)}); "
                                f"a checkpoint folder holds one saver's output, with one description")
    raise InvalidModelError(f"{path} is not an ascendv1 checkpoint: {DESCRIPTION} is missing"
                            f"{other_layout_hint(path)}")


def read_description(path: Path) -> dict:
    """The description as a JSON object (the checker judges its entries; `validate_description` for reading)."""
    return read_json(description_file(path))


def other_layout_hint(path: Path) -> str:
    """What to pass instead when `path` is another layout `quant` writes ("" for anything else)."""
    from msmodelslim.format.compressed_tensors.checker import is_compressed_tensors
    from msmodelslim.format.fan_out import SUBFOLDERS

    inner = path / SUBFOLDERS["ascendv1_saver"]
    if (inner / DESCRIPTION).is_file():
        return f"; {path} holds one folder per saved format: pass its ascendv1 folder, {inner}"
    if is_compressed_tensors(path):
        return (f"; {path} is a compressed-tensors checkpoint (transformers and vLLM load it; `msmodelslim eval` of a "
                f"text or vision-language model reads it too, this command reads ascendv1). Save both formats from "
                f"one run (spec.save: [{{type: ascendv1_saver}}, {{type: compressed_tensors}}]: each folder holds "
                f"exactly what that saver alone writes) and pass the ascendv1 folder")
    return ""


QUANTIZED_TAGS = (*(s.value for s in Scheme if s.value in REQUIRED_SUFFIXES), *TAG_ALIASES)  # not W4A16_NVFP4
READABLE_TAGS = (FLOAT, *QUANTIZED_TAGS, *(svd_tag(t) for t in QUANTIZED_TAGS), *map(flat_tag, FLAT_INNER_TAGS),
                 W16A16S, C8, FA_QUANT)


def validate_description(path: Path, description: dict) -> None:
    """Every tensor entry carries a type this reader rebuilds; a clear error before any tensor is read."""
    for key, tag in description.items():
        if key in GLOBAL_KEYS or (attention_entry(key) and isinstance(tag, str)):
            continue
        if not isinstance(tag, str):
            raise InvalidModelError(f"{description_file(path)}: entry {key!r} has type tag {tag!r}; tags are strings "
                                    f"such as {', '.join(READABLE_TAGS)}")
        if tag not in READABLE_TAGS:
            raise InvalidModelError(f"{description_file(path)}: entry {key!r} has type {tag!r}, which this reader "
                                    f"cannot rebuild (known: {', '.join(READABLE_TAGS)})")


def read_valid_description(path: Path) -> dict:
    """Read and validate the description: what eval/convert check before loading any model."""
    reason = incomplete_reason(path)
    if reason:  # e.g. the staging directory of a killed run, description and all
        raise InvalidModelError(f"{path} is not a complete checkpoint: {reason}")
    description = read_description(path)
    validate_description(path, description)
    return description


def require_described_tensors(path: Path, description: dict, flag: str) -> None:
    """Every tensor the description names is in the shards (headers only): a missing or damaged shard fails
    before any model is loaded (for eval: before the float model's whole run)."""
    present = tensor_names(path, flag)
    missing = sorted(k for k in description if k not in GLOBAL_KEYS and not attention_entry(k) and k not in present)
    if not missing:
        return
    prefix = missing[0].rpartition(".")[0]
    tag = quantized_layers(description).get(prefix)
    if tag is not None:  # the same words as the reader's, which finds this only after reading every tensor
        own = [k for k in missing if k.rpartition(".")[0] == prefix]
        raise InvalidModelError(f"{path}: quantized layer {prefix} ({tag}) lacks tensor(s) {', '.join(own)}; the "
                                f"checkpoint is incomplete")
    raise InvalidModelError(f"{flag} {path} lacks {len(missing)} tensor(s) its description names (e.g. "
                            f"{missing[0]}); the checkpoint is incomplete")


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


def _quant_linear(path: Path, prefix: str, tag: str, own: dict[str, torch.Tensor]) -> nn.Module:
    """The layer's QuantLinear, or an InvalidModelError naming the layer and what is wrong with its tensors."""
    missing = sorted(REQUIRED_SUFFIXES[tag] - own.keys())
    if missing:
        raise InvalidModelError(f"{path}: quantized layer {prefix} ({tag}) lacks tensor(s) "
                                f"{', '.join(f'{prefix}.{m}' for m in missing)}; the checkpoint is incomplete")
    try:
        return linear_from_tensors(tag, own)
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise InvalidModelError(f"{path}: quantized layer {prefix} ({tag}) has inconsistent tensors: "
                                f"{type(exc).__name__}: {exc}") from None


def outside_architecture(model: nn.Module, description: dict, names) -> list[str]:
    """The FLOAT tensors among `names` whose module the architecture lacks, such as the multi-token-prediction
    layer (`model.layers.<num_hidden_layers>.*`) that quant writes through unchanged: not part of the model this
    reader builds; `convert` carries them over as they are. A misspelled tensor of an existing module is not
    among them (loading then fails, naming it)."""
    return sorted(n for n in names if description.get(n) == FLOAT and not has_module(model, n.rpartition(".")[0]))


def _take_by_attention(path: Path, groups: dict[str, list[str]], build, tag: str,
                       tensors: dict[str, torch.Tensor]) -> dict:
    """{attention: build(attention, tensors)} for each attention with tensors tagged `tag` (their names in `groups`),
    which are removed from `tensors`; a missing or inconsistent tensor names the attention."""
    built = {}
    for attention, names in groups.items():
        try:
            built[attention] = build(attention, tensors)
        except KeyError as exc:
            raise InvalidModelError(f"{path}: attention {attention} has {tag} tensors but lacks {exc}; the checkpoint "
                                    f"is incomplete") from None
        except ValueError as exc:
            raise InvalidModelError(f"{path}: the {tag} tensors of {attention} are inconsistent: {exc}") from None
        for name in names:
            tensors.pop(name, None)
    return built


def take_kv_caches(path: Path, description: dict, tensors: dict[str, torch.Tensor]) -> dict[str, KVCacheQuant]:
    """{attention: its C8 cache} from the tensors tagged C8, which are removed from `tensors`."""
    return _take_by_attention(path, kv_cache_by_attention(description), kv_cache_from_tensors, "C8", tensors)


def _described_attention(path: Path, model: nn.Module, name: str, tag: str) -> nn.Module:
    """The attention module the description names for its `tag` tensors; a clear error when the architecture in
    config.json has none there (description and config.json from different models)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InvalidModelError(f"{path}: the description has {tag} tensors for {name}, which the architecture in "
                                f"config.json does not have") from None


def install_kv_caches(path: Path, model: nn.Module, caches: dict[str, KVCacheQuant]) -> None:
    """Each attention quantizes the K/V it writes into its cache and reads them back with the scale alone, as
    vLLM-Ascend's C8 does (ir/kv_cache.py). A forward without a cache (perplexity) attends over K/V as a decoding
    step reads them from the cache; the engine's prefill attends over the prompt's float K/V."""
    for attention_name, quant in caches.items():
        attention = _described_attention(path, model, attention_name, "C8")
        if cache_argument(attention) is None:
            raise InvalidModelError(f"{path}: {attention_name} ({type(attention).__name__}) takes no cache argument, "
                                    f"so its C8 cache cannot be simulated")
        install_kv_cache_quant(attention, quant)


def take_fa3(path: Path, description: dict, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, FA3HeadQuant]]:
    """{attention: {fa_q, fa_k, fa_v: FA3HeadQuant}} from the tensors tagged FAQuant, which are removed from
    `tensors`. A `<attn>.quant_type` without scales is `dynamic_fa3` (int8 per_token "INT8_DYNAMIC" is not read:
    the engine enables int8 FA quant only for layers with saved scales, formats.md A.6)."""
    return _take_by_attention(path, fa3_by_attention(description), fa3_from_tensors, "FAQuant", tensors)


def dynamic_fa3(path: Path, description: dict) -> dict[str, dict[str, nn.Module]]:
    """{attention: {fa_q, fa_k, fa_v: module}} for the attentions whose `<attn>.quant_type` names a dynamic
    floating-point branch (FP8_DYNAMIC, MXFP8_DYNAMIC, MXFP4_DYNAMIC): quantized at run time as the kernel does
    (ir/fa3.py FA3DynamicQuant). A string this version does not write is refused (it would be served otherwise)."""
    out = {}
    for attention, tokens in fa3_quant_types(description).items():
        value = description[f"{attention}.quant_type"]
        if not tokens:
            raise InvalidModelError(f"{path}: {attention}.quant_type is {value!r}, an attention quantization this "
                                    f"reader cannot simulate; run `msmodelslim check` on it")
        if STATIC_TOKEN in tokens.values() and set(tokens.values()) != {STATIC_TOKEN}:
            raise InvalidModelError(f"{path}: {attention}.quant_type {value!r} mixes static and dynamic branches")
        branches = dynamic_fa3_branches(tokens)
        if branches:
            out[attention] = branches
    return out


def install_fa3_quants(path: Path, model: nn.Module, quants: dict[str, dict[str, nn.Module]]) -> None:
    """Each attention quantizes Q, K and V (per head with the saved scale, or dynamically) and dequantizes them right
    before its kernel, as the engine's FA quant (model/fa3.py; MLA in the absorbed latent space)."""
    for attention_name, branches in quants.items():
        attention = _described_attention(path, model, attention_name, "FA3")
        layout = "mla" if mla_layout(attention) else "gqa"
        try:
            install_fa3(attention, layout, branches)
        except ValueError as exc:
            raise InvalidModelError(f"{path}: cannot simulate FA quant on {attention_name}: {exc}") from None


def load_ascendv1(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    path = require_local_dir(path, "the ascendv1 checkpoint")
    description = read_valid_description(path)
    dynamic = dynamic_fa3(path, description)  # a string it cannot simulate is refused before any tensor is read
    config, model, _ = empty_model(path, trust_remote_code)
    tensors = read_tensors(path)
    kv_caches = take_kv_caches(path, description, tensors)
    fa3_quants: dict[str, dict[str, nn.Module]] = {**take_fa3(path, description, tensors), **dynamic}
    consumed: set[str] = set()
    layers = quantized_layers(description)
    for prefix, own in tensors_by_layer(tensors, layers).items():
        tag = layers[prefix]
        consumed.update(f"{prefix}.{k}" for k in own)
        parent_name, _, child = prefix.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise InvalidModelError(f"{path}: the description names layer {prefix}, which the architecture in "
                                    f"config.json does not have") from None
        linear, original = _quant_linear(path, prefix, tag, own), getattr(parent, child, None)
        if isinstance(original, nn.Linear) and (linear.in_features, linear.out_features) != (
                original.in_features, original.out_features):
            raise InvalidModelError(f"{path}: quantized layer {prefix} is [{linear.out_features}, {linear.in_features}]"
                                    f", but config.json gives [{original.out_features}, {original.in_features}]")
        setattr(parent, child, linear)
    extra = outside_architecture(model, description, tensors)
    if extra:  # e.g. the multi-token-prediction layer quant passes through; vLLM loads it into its draft model
        log.info("%s: %d FLOAT tensor(s) outside the architecture config.json describes are not loaded: %s%s", path,
                 len(extra), ", ".join(extra[:4]), " ..." if len(extra) > 4 else "")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()
             if k not in consumed and k not in extra}
    load_float_tensors(path, model, config, state, layers)
    install_kv_caches(path, model, kv_caches)
    install_fa3_quants(path, model, fa3_quants)
    return model
