"""Check an ascendv1 checkpoint against the writer checklist (what vLLM-Ascend's loader requires).

Errors mean the engine will fail or compute garbage; warnings mean the checkpoint is valid ascendv1 but the
named engine version does not load that layer type (the user chose it knowingly, e.g. W4A16 on dense layers).

Routed MoE experts (`….experts.<e>.<proj>`, formats.md A.5) are checked against the engine's MoE schemes: all
experts of a layer share one type (the engine reads expert 0's), no static activations, W4A8_DYNAMIC only with
`group_size` 0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from msmodelslim.format.ascendv1.reader import (GLOBAL_KEYS, attention_entry, quantized_layers, read_description,
                                                tensors_by_layer)
from msmodelslim.format.ascendv1.fa3 import check_fa3
from msmodelslim.format.ascendv1.flat_check import check_flat_transform_tensors, check_fused_flat_transforms
from msmodelslim.format.ascendv1.kv_cache import check_kv_cache
from msmodelslim.format.ascendv1.rotation_check import check_online_rotations, rotation_tensor_names
from msmodelslim.format.ascendv1.tensors import (FLAT_INNER_TAGS, FLOAT, FLOAT_WEIGHT_DTYPES, decode_deq_scale,
                                                 split_flat_tag, split_svd_tag, unpack_int4_int32, unpack_int4_rows)
from msmodelslim.format.findings import Finding
from msmodelslim.format.integrity import read_checked_tensors
from msmodelslim.ir.flat_transform import FLAT_TENSORS
from msmodelslim.ir.lowrank import LOWRANK_L1, LOWRANK_L2
from msmodelslim.model.moe import expert_of
from msmodelslim.quantizer.primitives import all_finite

DENSE_LOADABLE = {"W8A8", "W8A8_MIX", "W8A8_DYNAMIC", "W8A16", "W4A4_DYNAMIC", "W8A8FP8_DYNAMIC", "W8A8_MXFP8",
                  "W4A8_MXFP", "W4A4_MXFP4"}
# What the engine's fused-MoE layer accepts (formats.md A.3 registry, "moe" column).
MOE_LOADABLE = {"W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16", "W4A4_MXFP4", "W4A8_MXFP", "W8A8_MXFP8", "W4A16_MXFP4",
                "W8A8FP8_DYNAMIC"}
ENGINE = "vLLM-Ascend (182b75e)"
# Valid ascendv1 that no dense registry of the engine loads as written: the user chose it knowingly (a warning).
NOT_LOADED = {
    "W8A8S": f"{ENGINE} loads W8A8S only in its Atlas 300I (310P) registry, and the 310P deployment first compresses it "
             f"to W8A8SC with a separate tool (the engine's 310P sharded-state compression example)",
    "WFP8AFP8_DYNAMIC": f"WFP8AFP8_DYNAMIC is the established writer's spelling of FP8 dynamic; {ENGINE} reads the "
                        f"same tensors only under the tag W8A8FP8_DYNAMIC and rejects this one (formats.md A.4.9)",
    "W4A4_MXFP4_DUALSCALE": f"{ENGINE} has no scheme for W4A4_MXFP4_DUALSCALE (formats.md A.3: the established "
                            f"tool writes it, no engine registry loads it)",
    "W16A16S": f"no engine loads W16A16S ({ENGINE} has no scheme for it); the established tool's weight compression "
               f"turns it into W16A16SC for the Atlas 300I (310P) compression unit",
}
SVD_NOT_LOADED = (f"{ENGINE} has no scheme for _SVD types (SVDQuant's low-rank branch, svd_lowrank_l1/l2): it does "
                  f"not load this layer (formats.md A.4.10)")
MX_ELEMENT_BITS = {"W8A8_MXFP8": 8, "W4A8_MXFP": 4, "W4A4_MXFP4": 4, "W4A16_MXFP4": 4, "W4A4_MXFP4_DUALSCALE": 4}


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _layer_shape(tag: str, t: dict[str, torch.Tensor]) -> list[int] | None:
    """[N, K] of a quantized layer from its stored tensors (packings undone), None when they do not say."""
    if tag == "W4A16":
        shape = t.get("weight_shape")
        return None if shape is None or shape.numel() != 2 else [int(v) for v in shape]
    w = t.get("weight")
    if w is None or w.dim() != 2:
        return None
    if tag == "W4A8_DYNAMIC":  # two output rows per byte
        return [w.shape[0] * 2, w.shape[1]]
    if w.dtype == torch.uint8:  # FP4: two input elements per byte
        return [w.shape[0], w.shape[1] * 2]
    return list(w.shape)


def _check_lowrank(prefix: str, inner: str, t: dict[str, torch.Tensor]) -> list[Finding]:
    """SVDQuant's pair: svd_lowrank_l1 [r, K] and svd_lowrank_l2 [N, r], float, finite, 0 < r <= min(N, K)."""
    f: list[Finding] = []
    err = lambda m: f.append(Finding("error", f"{prefix}: {m}"))
    missing = [s for s in (LOWRANK_L1, LOWRANK_L2) if s not in t]
    if missing:
        err(f"{inner}_SVD type needs tensor(s) {', '.join(repr(m) for m in missing)}")
        return f
    l1, l2 = t[LOWRANK_L1], t[LOWRANK_L2]
    for suffix, tensor in ((LOWRANK_L1, l1), (LOWRANK_L2, l2)):
        if tensor.dtype not in FLOAT_WEIGHT_DTYPES or tensor.dim() != 2:
            err(f"'{suffix}' must be a 2-D float16/bfloat16/float32 tensor, got {tensor.dtype} {_shape(tensor)}")
            return f
        if not all_finite(tensor):
            err(f"'{suffix}' holds non-finite values")
    layer = _layer_shape(inner, t)
    if layer is not None:
        n, k = layer
        r = l1.shape[0]
        if _shape(l1) != [r, k] or _shape(l2) != [n, r]:
            err(f"'{LOWRANK_L1}' {_shape(l1)} and '{LOWRANK_L2}' {_shape(l2)} must be [r, {k}] and [{n}, r]")
        elif not 0 < r <= min(n, k):
            err(f"low-rank rank {r} is outside 1..{min(n, k)}")
    return f


def _check_linear(prefix: str, tag: str, t: dict[str, torch.Tensor], model_dtype: str | None,
                  is_expert: bool = False) -> list[Finding]:
    inner, flat = split_flat_tag(tag)
    if flat:  # the inner type's checks on its own tensors, then the transform's
        if inner not in FLAT_INNER_TAGS:
            return [Finding("error", f"{prefix}: unknown type {tag!r} (FlatQuant is read for "
                                     f"{' and '.join(FLAT_INNER_TAGS)})")]
        own = {k: v for k, v in t.items() if k not in FLAT_TENSORS}
        shape = _layer_shape(inner, own)
        return (_check_linear(prefix, inner, own, model_dtype, is_expert)
                + check_flat_transform_tensors(prefix, tag, t, None if shape is None else shape[1],
                                               mxfp4=inner == "W4A4_MXFP4"))
    inner, lowrank = split_svd_tag(tag)
    if lowrank:  # the inner type's checks, the pair's, and: no engine loads it (formats.md A.4.10)
        found = _check_linear(prefix, inner, t, model_dtype, is_expert) + _check_lowrank(prefix, inner, t)
        return found + [Finding("warning", f"{prefix}: {tag}: {SVD_NOT_LOADED}")]
    f: list[Finding] = []
    err = lambda m: f.append(Finding("error", f"{prefix}: {m}"))
    warn = lambda m: f.append(Finding("warning", f"{prefix}: {m}"))

    def need(suffix: str, dtype: torch.dtype | None, shape: list[int] | None) -> torch.Tensor | None:
        if suffix not in t:
            err(f"{tag} needs tensor '{suffix}'")
            return None
        if dtype is not None and t[suffix].dtype != dtype:
            err(f"'{suffix}' is {t[suffix].dtype}, expected {dtype}")
        if shape is not None and _shape(t[suffix]) != shape:
            err(f"'{suffix}' has shape {_shape(t[suffix])}, expected {shape}")
        return t[suffix]

    if tag in ("W8A8", "W8A8_MIX", "W8A8S"):
        w = need("weight", torch.int8, None)
        if w is None:
            return f
        n = w.shape[0]
        if tag == "W8A8_MIX":  # the dynamic (prefill) half reads these, as W8A8_DYNAMIC does
            need("weight_scale", torch.float32, [n, 1])
            offset = need("weight_offset", torch.float32, [n, 1])
            if offset is not None and bool(offset.abs().sum() > 0):
                err("W8A8_MIX weights must be symmetric (weight_offset all zero)")
        need("quant_bias", torch.int32, [n])
        need("input_scale", None, [1])
        need("input_offset", None, [1])
        expected = torch.float32 if model_dtype == "bfloat16" else torch.int64
        deq = need("deq_scale", expected, [n])
        if deq is not None and not bool((decode_deq_scale(deq) > 0).all()):
            err("deq_scale must be positive")
        if "bias" in t and t["bias"].dtype != torch.float32:
            err("bias of a quantized layer must be float32")
    elif tag in ("W8A8_DYNAMIC", "W8A16"):
        w = need("weight", torch.int8, None)
        if w is None:
            return f
        scale = need("weight_scale", torch.float32, None)
        offset = need("weight_offset", torch.float32, None)
        if scale is not None and (scale.dim() != 2 or scale.shape[0] != w.shape[0]):
            err(f"weight_scale must be 2-D [N, 1] or [N, K/G], got {_shape(scale)}")
        elif scale is not None and scale.shape[1] != 1:
            warn(f"per-group {tag} (weight_scale {_shape(scale)}) is valid ascendv1 but {ENGINE} loads only [N, 1]")
        if offset is not None and scale is not None and offset.shape != scale.shape:
            err("weight_offset must have weight_scale's shape")
        if offset is not None and bool(offset.abs().sum() > 0):
            if tag == "W8A8_DYNAMIC":
                err("W8A8_DYNAMIC weights must be symmetric (weight_offset all zero)")
            else:
                warn(f"asymmetric W8A16: {ENGINE} applies the offset with the opposite sign; use symmetric weights there")
    elif tag == "W4A4_DYNAMIC":  # formats.md A.4.7: int4 codes unpacked in int8, per-channel f32 scales
        w = need("weight", torch.int8, None)
        if w is None or w.dim() != 2:
            return f
        need("weight_scale", torch.float32, [w.shape[0], 1])
        offset = need("weight_offset", torch.float32, [w.shape[0], 1])
        if not bool(((w >= -8) & (w <= 7)).all()):
            err("W4A4_DYNAMIC weight holds codes outside the int4 range -8..7")
        if offset is not None and bool(offset.abs().sum() > 0):
            err("W4A4_DYNAMIC weights must be symmetric (the engine ignores weight_offset)")
    elif tag == "W4A8_DYNAMIC":
        w = need("weight", torch.int8, None)
        if w is None:
            return f
        n = w.shape[0] * 2
        need("weight_scale", torch.float32, [n, 1])
        off = need("weight_offset", torch.float32, [n, 1])
        if off is not None and bool(off.abs().sum() > 0):
            err("W4A8_DYNAMIC weights must be symmetric")
        sb = need("scale_bias", torch.float32, None)
        if sb is not None and _shape(sb) not in ([n, 1], [n, 16]):
            err(f"scale_bias must be [N,1] or [N,16], got {_shape(sb)}")
        if sb is not None and "weight_scale" in t:
            dequant = unpack_int4_rows(w).float() * t["weight_scale"]
            chunks = dequant.reshape(n, sb.shape[1], -1).sum(-1) * 8
            if not torch.allclose(chunks, sb, rtol=1e-4, atol=1e-4):
                err("scale_bias does not equal 8·Σ W_f")
        if not is_expert:
            warn(f"W4A8_DYNAMIC on a dense linear: {ENGINE} loads W4A8_DYNAMIC for MoE experts only")
    elif tag == "W4A16":
        packed = need("weight_packed", torch.int32, None)
        shape = need("weight_shape", None, [2])
        need("weight_scale", None, None)
        if packed is not None and shape is not None:
            n, k = (int(v) for v in shape)
            if _shape(packed) != [n, k // 8]:
                err(f"weight_packed must be [N, K/8] = {[n, k // 8]}, got {_shape(packed)}")
            elif not bool((unpack_int4_int32(packed).abs() <= 8).all()):
                err("weight_packed holds codes outside the int4 range")
        if not is_expert:
            warn(f"W4A16 on a dense linear: {ENGINE} loads W4A16 for MoE experts only")
    elif tag in ("WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC"):  # formats.md A.4.9
        w = need("weight", torch.float8_e4m3fn, None)
        if w is None or w.dim() != 2:
            return f
        scale = need("weight_scale", torch.float32, [w.shape[0], 1])
        offset = need("weight_offset", None, [w.shape[0], 1])
        if scale is not None and not bool((scale > 0).all() & torch.isfinite(scale).all()):
            err("weight_scale must be positive and finite")
        if offset is not None and bool(offset.float().abs().sum() > 0):
            err("FP8 dynamic weights are symmetric (weight_offset all zero)")
        if not all_finite(w):
            err("weight holds NaN codes")
    elif tag in MX_ELEMENT_BITS:  # formats.md A.4.10: E8M0 scales per 32 along K, FP4 two codes per byte
        fp4 = MX_ELEMENT_BITS[tag] == 4
        w = need("weight", torch.uint8 if fp4 else torch.float8_e4m3fn, None)
        if w is None or w.dim() != 2:
            return f
        k = w.shape[1] * (2 if fp4 else 1)
        scale = need("weight_scale", torch.uint8, [w.shape[0], -(-k // 32)])
        if scale is not None and bool((scale == 255).any()):
            err("weight_scale holds 255, the E8M0 NaN")
        if k % 32:
            err(f"the input size {k} is not a multiple of 32: the engine quantizes activations per block of 32")
        if not fp4 and not all_finite(w):
            err("weight holds NaN codes")
        if tag == "W4A4_MXFP4_DUALSCALE":  # [N, K/D, 1] float32, positive, D a multiple of 32 dividing K
            dual = need("weight_dual_scale", torch.float32, None)
            if dual is not None and (dual.dim() != 3 or dual.shape[0] != w.shape[0] or dual.shape[2] != 1
                                     or k % dual.shape[1] or (k // dual.shape[1]) % 32):
                err(f"'weight_dual_scale' must be [N, K/D, 1] with D a multiple of 32 dividing K = {k}, got {_shape(dual)}")
            elif dual is not None and not bool((dual > 0).all() & torch.isfinite(dual).all()):
                err("weight_dual_scale must be positive and finite")
            if "bias" in t and t["bias"].dtype != torch.float32:
                err("bias of a quantized layer must be float32")
        if tag == "W4A16_MXFP4" and not is_expert:
            warn(f"W4A16_MXFP4 on a dense linear: {ENGINE} loads W4A16_MXFP4 for MoE experts only")
    elif tag == "W16A16S":
        w = need("weight", None, None)
        if w is None:
            return f
        if w.dim() != 2 or w.dtype not in FLOAT_WEIGHT_DTYPES:
            err(f"W16A16S 'weight' must be a 2-D float16/bfloat16/float32 tensor, got {w.dtype} {_shape(w)}")
        elif "bias" in t and _shape(t["bias"]) != [w.shape[0]]:
            err(f"'bias' has shape {_shape(t['bias'])}, expected {[w.shape[0]]}")
    else:
        err(f"unknown type {tag!r}")
        return f
    if tag in NOT_LOADED:
        if is_expert and tag == "W8A8S":
            err("W8A8S on a routed expert: there is no static-activation MoE scheme")
        else:
            warn(NOT_LOADED[tag])
    elif is_expert and tag in ("W8A8", "W8A8_MIX"):
        err(f"{tag} on a routed expert: there is no static-activation MoE scheme; use W8A8_DYNAMIC or W4A8_DYNAMIC")
    elif is_expert and tag not in MOE_LOADABLE:
        warn(f"{tag} on a routed expert: {ENGINE} does not load {tag} for MoE experts")
    elif not is_expert and tag not in ("W4A8_DYNAMIC", "W4A16", "W4A16_MXFP4") and tag not in DENSE_LOADABLE:
        err(f"{tag} is not a type {ENGINE} loads for linear layers")
    return f


def check_moe_experts(description: dict) -> list[Finding]:
    """Per MoE layer: one type for all expert linears (FLOAT included), W4A8_DYNAMIC only with group_size 0."""
    findings: list[Finding] = []
    types: dict[str, set[str]] = {}
    for key, tag in description.items():
        prefix, _, suffix = key.rpartition(".")
        where = expert_of(prefix) if suffix in ("weight", "weight_packed") else None
        if where is not None:
            types.setdefault(where[0], set()).add(tag)
    for layer, tags in sorted(types.items()):
        if len(tags) > 1:
            findings.append(Finding("error", f"{layer}: experts have different types {sorted(tags)}; the engine "
                                             f"reads expert 0's type for all experts of a layer"))
        if "W4A8_DYNAMIC" in tags and description.get("group_size", 0):
            findings.append(Finding("warning", f"{layer}: W4A8_DYNAMIC experts with group_size "
                                               f"{description['group_size']}: {ENGINE} refuses per-group W4A8 MoE "
                                               f"(the description's group_size must be 0)"))
    return findings


# {text embedding / head: where vision-language layouts keep them}
# (the Omni thinkers keep theirs under `thinker.`: model/vlm_omni.py)
VLM_SPELLINGS = {"model.embed_tokens": ("model.language_model.embed_tokens", "language_model.model.embed_tokens",
                                        "thinker.model.embed_tokens"),
                 "lm_head": ("language_model.lm_head", "thinker.lm_head")}


def check_ascendv1(
    path: Path, expected_linears: list[str] | None = None, fused_groups: tuple[tuple[str, ...], ...] = ()
) -> list[Finding]:
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    description = read_description(path)
    config = checked_output_config(path, err)
    if description.get("version") != "1.0.0":
        err("description 'version' must be \"1.0.0\"")
    if not isinstance(description.get("group_size"), int):
        err("description 'group_size' must be an integer")
    for key in ("metadata", "optional"):
        if not isinstance(description.get(key), dict):
            err(f"description '{key}' must be an object")
    if "model_quant_type" not in description:
        err("description lacks 'model_quant_type'")
    layers = quantized_layers(description)
    if {split_svd_tag(t)[0] for t in layers.values()} & MX_ELEMENT_BITS.keys() and description.get("group_size") != 32:
        err(f"description 'group_size' is {description.get('group_size')!r}; MX layers need 32 (their block size)")
    model_dtype = config.get("dtype") or config.get("torch_dtype")
    return findings + check_described_tensors(path, description, model_dtype, expected_linears, fused_groups)


def checked_output_config(path: Path, err: Callable[[str], None]) -> dict:
    """The output's config.json (an error when it is missing, still carries a quantization_config, or sits beside
    the source model's own weight files)."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    if config is None:
        err("config.json is missing")
        config = {}
    if "quantization_config" in config or "quantization_config" in (config.get("text_config") or {}):
        err("config.json still carries quantization_config (vLLM would ignore the description)")
    for stale in ("model.safetensors.index.json", "model.safetensors"):
        if (path / stale).exists():
            err(f"{stale} from the source model is in the output")
    return config


def check_described_tensors(path: Path, description: dict, model_dtype: str | None,
                            expected_linears: list[str] | None = None,
                            fused_groups: tuple[tuple[str, ...], ...] = ()) -> list[Finding]:
    """What the ascendv1 and the MindIE layouts share: every tensor has its entry and every entry its tensor, each
    quantized linear's tensors are those of its type (`model_dtype` picks deq_scale's dtype), online rotations,
    MoE experts, KV cache and FA3 entries are consistent, every linear the engine instantiates is described,
    fused layers share one type."""
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    tensors = read_checked_tensors(path, err)
    if not tensors:
        err("no *.safetensors weights")
    entries = {k for k in description if k not in GLOBAL_KEYS and not attention_entry(k)}
    layers = quantized_layers(description)
    rotations = rotation_tensor_names(tensors)  # written without an entry (protocol.md §4.4)
    for key in sorted(set(tensors) - entries - rotations)[:20]:
        err(f"tensor {key} has no entry in the description")
    for key in sorted(entries - set(tensors))[:20]:
        err(f"description entry {key} has no tensor")

    in_features = {}
    for prefix, own in tensors_by_layer(tensors, layers).items():
        findings.extend(_check_linear(prefix, layers[prefix], own, model_dtype, expert_of(prefix) is not None))
        shape = _layer_shape(split_flat_tag(split_svd_tag(layers[prefix])[0])[0], own)
        in_features[prefix] = None if shape is None else shape[1]
    findings.extend(check_online_rotations(description, tensors, in_features))
    findings.extend(check_moe_experts(description))
    findings.extend(check_kv_cache(description, tensors))
    findings.extend(check_fa3(description, tensors))
    for name, tag in description.items():
        if name in GLOBAL_KEYS or tag != FLOAT or name not in tensors:
            continue
        if name.endswith(".bias") and name[:-5] in layers and tensors[name].dtype != torch.float32:
            err(f"{name}: bias of a quantized layer must be float32")

    def has_weight_entry(prefix: str) -> bool:
        return f"{prefix}.weight" in description or f"{prefix}.weight_packed" in description

    for prefix in expected_linears or []:
        if not has_weight_entry(prefix):
            err(f"{prefix}.weight has no description entry (the engine raises KeyError)")
    # DeepSeek-V4 keeps its native names (`embed`, `head`); vLLM-Ascend aliases them when `hc_head_fn` exists (A.2)
    native_v4 = "hc_head_fn" in description
    for prefix, native in (("model.embed_tokens", "embed"), ("lm_head", "head")):
        # a vision-language model keeps its text embedding (and head) where its layout puts them: Qwen3-VL
        # (transformers 5 names) at model.language_model.embed_tokens, InternVL -HF under language_model.
        spellings = (native,) if native_v4 else (prefix, *VLM_SPELLINGS[prefix])
        if expected_linears is not None and not any(has_weight_entry(p) for p in spellings):
            err(f"{spellings[0]}.weight must be written and tagged FLOAT")
    for group in fused_groups:
        for prefix in {p.rsplit(".", 1)[0] for p in layers} | {p.rsplit(".", 1)[0] for p in expected_linears or []}:
            members = [f"{prefix}.{m}" for m in group if has_weight_entry(f"{prefix}.{m}")]
            if len(members) < 2:
                continue
            tags = {layers.get(m, FLOAT) for m in members}
            if len(tags) > 1:
                err(f"fused layers {members} have different types {sorted(tags)}; the engine needs one")
            scales = [tensors.get(f"{m}.input_scale") for m in members]
            if all(s is not None for s in scales) and not all(torch.equal(scales[0], s) for s in scales[1:]):
                err(f"fused layers {members} have different input_scale; the engine keeps only the last")
            findings.extend(check_fused_flat_transforms(members, tensors))
    return findings
