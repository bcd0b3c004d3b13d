"""C8 (int8 KV cache) in ascendv1: tensor names, the description keys, and the checklist (formats.md A.2, A.6, C.1
item 11).

For an attention `<attn>` (e.g. `model.layers.3.self_attn`):

    <attn>.k_proj.kv_cache_scale   <attn>.k_proj.kv_cache_offset      float32 [kv_heads·head_dim], tag "C8"
    <attn>.v_proj.kv_cache_scale   <attn>.v_proj.kv_cache_offset

plus the global keys `kv_cache_type: "C8"` (what vLLM-Ascend reads to enable C8) and `kv_quant_type: "C8"`. The
engine finds C8 layers by the substring `k_proj.kv_cache_scale` whatever the attention's own projection names.
It dequantizes with the scale alone, so offsets must be zero (the writer only writes zeros).
"""
from __future__ import annotations

import torch

from msmodelslim.format.findings import Finding
from msmodelslim.ir.kv_cache import KVCacheQuant

C8 = "C8"
GLOBAL = {"kv_cache_type": C8, "kv_quant_type": C8}
# KV-cache dtypes (dynamic_cache qconfig) that vLLM-Ascend cannot read from this format (refused before any weight).
UNSUPPORTED_KV_CACHE = {"fp8_e4m3": "vLLM-Ascend's quantized KV cache is C8 (int8, one scale per channel); it reads "
                                    "no FP8 KV cache. Use qconfig {dtype: int8, scope: per_channel, symmetric: true, "
                                    "method: minmax}, or save with compressed_tensors (vLLM's FP8 cache on GPUs)"}
# (projection, suffix) -> the KVCacheQuant buffer it stores
TENSORS = {("k_proj", "kv_cache_scale"): "key_scale", ("k_proj", "kv_cache_offset"): "key_offset",
           ("v_proj", "kv_cache_scale"): "value_scale", ("v_proj", "kv_cache_offset"): "value_offset"}


def kv_cache_tensors(attention: str, quant: KVCacheQuant) -> dict[str, torch.Tensor]:
    """{full tensor name: float32 tensor} for one attention's C8 cache."""
    return {f"{attention}.{proj}.{suffix}": getattr(quant, buffer).float().contiguous()
            for (proj, suffix), buffer in TENSORS.items()}


def attention_of(tensor_name: str) -> str | None:
    """`<attn>` of a C8 tensor name, None for other names."""
    for proj, suffix in TENSORS:
        tail = f".{proj}.{suffix}"
        if tensor_name.endswith(tail):
            return tensor_name[: -len(tail)]
    return None


def kv_cache_by_attention(description: dict) -> dict[str, list[str]]:
    """{attention: [its C8 tensor names]} for every description entry tagged C8."""
    out: dict[str, list[str]] = {}
    for name, tag in description.items():
        attention = attention_of(name) if tag == C8 else None
        if attention is not None:
            out.setdefault(attention, []).append(name)
    return out


def kv_cache_from_tensors(attention: str, tensors: dict[str, torch.Tensor]) -> KVCacheQuant:
    """Rebuild one attention's KVCacheQuant from its saved tensors (KeyError when one is missing)."""
    values = {buffer: tensors[f"{attention}.{proj}.{suffix}"].float().reshape(-1)
              for (proj, suffix), buffer in TENSORS.items()}
    return KVCacheQuant(values["key_scale"], values["key_offset"], values["value_scale"], values["value_offset"])


def check_kv_cache(description: dict, tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """C.1 item 11: all four tensors per attention, float, 1-D, one size, the k_proj rows' count when the
    projection is saved; positive finite scales; zero offsets; kv_cache_type "C8" exactly when there are any."""
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    by_attention = kv_cache_by_attention(description)
    declared = description.get("kv_cache_type")
    if by_attention and declared != C8:
        err(f"the description holds C8 tensors but kv_cache_type is {declared!r}, not \"C8\": the engine would not "
            f"enable the int8 cache and would find no parameter for them")
    if declared == C8 and not by_attention:
        err("kv_cache_type is \"C8\" but no <attn>.k_proj.kv_cache_scale is written: the engine enables C8 with "
            "no scales")
    if declared is not None and declared != C8:
        err(f"kv_cache_type {declared!r} is not a type the engine knows (\"C8\")")
    if by_attention and description.get("kv_quant_type") != C8:
        findings.append(Finding("warning", f"kv_quant_type is {description.get('kv_quant_type')!r}; the writer of "
                                           f"the established tool sets it to \"C8\" with kv_cache_type"))
    for name, tag in description.items():
        if tag == C8 and name not in GLOBAL and attention_of(name) is None:
            err(f"{name} is tagged C8 but is not one of the C8 tensors <attn>.{{k,v}}_proj.kv_cache_{{scale,offset}}")
    for attention, names in sorted(by_attention.items()):
        expected = {f"{attention}.{proj}.{suffix}" for proj, suffix in TENSORS}
        missing = sorted(expected - set(names))
        if missing:
            err(f"{attention}: C8 needs {', '.join(missing)} in the description")
            continue
        present = {n: tensors.get(n) for n in expected}
        if any(t is None for t in present.values()):
            continue  # reported as an entry without a tensor
        sizes = {tuple(t.shape) for t in present.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            err(f"{attention}: C8 tensors must be 1-D [kv_heads·head_dim] of one size, got {sorted(sizes)}")
            continue
        for name, t in sorted(present.items()):
            if not t.is_floating_point():
                err(f"{name} is {t.dtype}; C8 scales and offsets are float")
            elif not bool(torch.isfinite(t.float()).all()):
                err(f"{name} holds NaN/Inf")
            elif name.endswith("kv_cache_scale") and not bool((t > 0).all()):
                err(f"{name} must be positive")
            elif name.endswith("kv_cache_offset") and bool(t.float().abs().sum() > 0):
                err(f"{name} is not zero: vLLM-Ascend dequantizes the cache with the scale alone, so every cached "
                    f"value would be shifted by offset·scale")
        k_weight = tensors.get(f"{attention}.k_proj.weight")
        channels = next(iter(sizes))[0]
        if k_weight is not None and description.get(f"{attention}.k_proj.weight") in ("FLOAT", "W8A8", "W8A8_DYNAMIC",
                                                                                        "W8A8_MIX", "W8A16"):
            if k_weight.shape[0] != channels:
                err(f"{attention}: C8 tensors have {channels} channels, k_proj writes {k_weight.shape[0]} "
                    f"(kv_heads·head_dim)")
    return findings
