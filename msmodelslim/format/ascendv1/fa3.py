"""FA3 attention quantization in ascendv1: tensor names, the description keys, the reader's rebuild and the checklist
(formats.md A.2, A.6, C.1; protocol.md §4.3–4.4).

For an attention `<attn>` (e.g. `model.layers.3.self_attn`) with static per-head int8 Q/K/V:

    <attn>.fa_q.scale  float32 [heads, 1]      <attn>.fa_q.offset  int8 zeros [heads, 1]      tag "FAQuant"
    <attn>.fa_k.scale  float32 [kv_heads, 1]   <attn>.fa_k.offset                             (MLA: kv_heads = 1,
    <attn>.fa_v.scale  float32 [kv_heads, 1]   <attn>.fa_v.offset                              the latent head)

plus `<attn>.quant_type` ("INT8") and the global `fa_quant_type: "FAKQuant"` whenever scales are saved.
vLLM-Ascend enables FA quant on a non-empty fa_quant_type and finds the layers by the substring `fa_k.scale`; it
dequantizes with the scale alone, so offsets are zeros.

Dynamic branches save no tensors, only `<attn>.quant_type` (protocol.md §4.3): one token per branch Q, K, V
(INT8_DYNAMIC, FP8_DYNAMIC, MXFP8_DYNAMIC, MXFP4_DYNAMIC), neighbours with one token merged ("KV_MXFP4_DYNAMIC"),
no prefix when all three share it: "FP8_DYNAMIC", "Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC". The reader rebuilds the
floating-point ones as `FA3DynamicQuant`; INT8_DYNAMIC is read by no engine and stays float.
"""
from __future__ import annotations

import torch

import re
from typing import Optional

from torch import nn

from msmodelslim.format.findings import Finding
from msmodelslim.ir.fa3 import BRANCHES, FA3DynamicQuant, FA3HeadQuant

FA_QUANT = "FAQuant"  # the tensors' tag
FA_QUANT_TYPE = "FAKQuant"  # the global key's value
GLOBAL = {"fa_quant_type": FA_QUANT_TYPE}
SUFFIXES = ("scale", "offset")
# a branch's token in `<attn>.quant_type` -> (dtype, scope) of the fa3_quant setting it comes from
BRANCH_TOKENS = {"INT8": ("int8", "per_head"), "INT8_DYNAMIC": ("int8", "per_token"),
                 "FP8_DYNAMIC": ("fp8_e4m3", "per_token"), "MXFP8_DYNAMIC": ("mxfp8", "per_block"),
                 "MXFP4_DYNAMIC": ("mxfp4", "per_block")}
STATIC_TOKEN = "INT8"  # the one token with saved scales
_GROUP = re.compile(r"([QKV]+)_(" + "|".join(sorted(BRANCH_TOKENS, key=len, reverse=True)) + r")(?:_|$)")


def branch_token(dtype: str, scope: str) -> str:
    """The token of one branch's setting (KeyError for a setting this version does not write)."""
    return {v: k for k, v in BRANCH_TOKENS.items()}[dtype, scope]


def join_quant_type(tokens: list[str]) -> str:
    """The `<attn>.quant_type` of the Q, K, V tokens: neighbours with one token merge, one token for all three
    drops the prefix."""
    if len(set(tokens)) == 1:
        return tokens[0]
    groups: list[tuple[str, str]] = []
    for letter, token in zip("QKV", tokens):
        if groups and groups[-1][1] == token:
            groups[-1] = (groups[-1][0] + letter, token)
        else:
            groups.append((letter, token))
    return "_".join(f"{letters}_{token}" for letters, token in groups)


def parse_quant_type(value: object) -> Optional[dict[str, str]]:
    """{fa_q, fa_k, fa_v: token} of a `<attn>.quant_type` string as `join_quant_type` writes it, else None."""
    if not isinstance(value, str):
        return None
    if value in BRANCH_TOKENS:
        return dict.fromkeys(BRANCHES, value)
    tokens: list[str] = []
    position = 0
    for match in _GROUP.finditer(value):
        if match.start() != position:
            return None
        tokens += [match[2]] * len(match[1])
        position = match.end()
    if position != len(value) or len(tokens) != 3 or join_quant_type(tokens) != value:
        return None
    return dict(zip(BRANCHES, tokens))


def fa3_quant_types(description: dict) -> dict[str, dict[str, str]]:
    """{attention: {fa_q, fa_k, fa_v: token}} of every FA3 `<attn>.quant_type` entry (the DeepSeek-V3.2 indexer's
    `<attn>.indexer.quant_type` is not FA3's); an unreadable string maps to {}."""
    return {key.removesuffix(".quant_type"): parse_quant_type(value) or {}
            for key, value in description.items()
            if key.endswith(".quant_type") and not key.endswith(".indexer.quant_type")}


def dynamic_fa3_branches(tokens: dict[str, str]) -> dict[str, nn.Module]:
    """{fa_q, fa_k, fa_v: module} for an attention with a dynamic floating-point branch (INT8_DYNAMIC ones stay
    nn.Identity, as no engine reads them), {} when it has none."""
    settings = {b: BRANCH_TOKENS[t] for b, t in tokens.items()}
    if all(dtype == "int8" for dtype, _ in settings.values()):
        return {}
    return {b: nn.Identity() if dtype == "int8" else FA3DynamicQuant(dtype, scope)
            for b, (dtype, scope) in settings.items()}


def fa3_tensors(branch_name: str, quant: FA3HeadQuant) -> dict[str, torch.Tensor]:
    """{`<attn>.fa_q.scale`: fp32 [heads,1], `<attn>.fa_q.offset`: int8 zeros [heads,1]} for one branch."""
    return {f"{branch_name}.scale": quant.scale.float().contiguous(),
            f"{branch_name}.offset": torch.zeros_like(quant.scale, dtype=torch.int8)}


def attention_of(tensor_name: str) -> str | None:
    """`<attn>` of an FA3 tensor name, None for other names."""
    for branch in BRANCHES:
        for suffix in SUFFIXES:
            tail = f".{branch}.{suffix}"
            if tensor_name.endswith(tail):
                return tensor_name[: -len(tail)]
    return None


def fa3_by_attention(description: dict) -> dict[str, list[str]]:
    """{attention: [its FA3 tensor names]} for every description entry tagged FAQuant."""
    out: dict[str, list[str]] = {}
    for name, tag in description.items():
        attention = attention_of(name) if tag == FA_QUANT else None
        if attention is not None:
            out.setdefault(attention, []).append(name)
    return out


def fa3_from_tensors(attention: str, tensors: dict[str, torch.Tensor]) -> dict[str, FA3HeadQuant]:
    """{fa_q, fa_k, fa_v: FA3HeadQuant} of one attention from its saved tensors (KeyError when one is missing)."""
    return {b: FA3HeadQuant(tensors[f"{attention}.{b}.scale"].float(), tensors[f"{attention}.{b}.offset"])
            for b in BRANCHES}


def check_fa3(description: dict, tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """formats.md C.1 for FA quant: all six tensors per attention, scale float32 [heads,1] positive and finite,
    offset int8 zeros of the same shape, fa_k and fa_v one shape; fa_quant_type "FAKQuant" exactly when there are
    any; a known `<attn>.quant_type` string for every attention with scales."""
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    by_attention = fa3_by_attention(description)
    declared = description.get("fa_quant_type")
    if by_attention and declared != FA_QUANT_TYPE:
        err(f"the description holds FAQuant tensors but fa_quant_type is {declared!r}, not \"FAKQuant\": the engine "
            f"would not enable FA quant")
    if declared is not None and not by_attention:
        err(f"fa_quant_type is {declared!r} but no <attn>.fa_k.scale is written: the engine enables FA quant with no "
            f"scales")
    for name, tag in description.items():
        if tag == FA_QUANT and attention_of(name) is None:
            err(f"{name} is tagged FAQuant but is not one of <attn>.fa_{{q,k,v}}.{{scale,offset}}")
    for attention, tokens in fa3_quant_types(description).items():
        value = description[f"{attention}.quant_type"]
        if not tokens:
            err(f"{attention}.quant_type is {value!r}; the FA3 types this version writes are {STATIC_TOKEN}, or "
                f"per branch Q, K, V one of {', '.join(t for t in BRANCH_TOKENS if t != STATIC_TOKEN)} (e.g. "
                f"'FP8_DYNAMIC', 'Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC')")
        elif STATIC_TOKEN in tokens.values() and set(tokens.values()) != {STATIC_TOKEN}:
            err(f"{attention}.quant_type is {value!r}: it mixes static {STATIC_TOKEN} (saved scales) with dynamic "
                f"branches; an attention is static or dynamic as a whole")
        elif STATIC_TOKEN not in tokens.values() and attention in by_attention:
            err(f"{attention}.quant_type is {value!r} (dynamic: the kernel computes its scales), but FAQuant scales "
                f"are saved for it")
    for attention, names in sorted(by_attention.items()):
        expected = {f"{attention}.{b}.{s}" for b in BRANCHES for s in SUFFIXES}
        missing = sorted(expected - set(names))
        if missing:
            err(f"{attention}: FA quant needs {', '.join(missing)} in the description")
            continue
        if description.get(f"{attention}.quant_type") != STATIC_TOKEN:
            err(f"{attention}: FAQuant scales are saved but {attention}.quant_type is "
                f"{description.get(f'{attention}.quant_type')!r}, not \"INT8\"")
        present = {n: tensors.get(n) for n in expected}
        if any(t is None for t in present.values()):
            continue  # reported as an entry without a tensor
        for branch in BRANCHES:
            scale, offset = present[f"{attention}.{branch}.scale"], present[f"{attention}.{branch}.offset"]
            where = f"{attention}.{branch}"
            if scale.dim() != 2 or scale.shape[1] != 1:
                err(f"{where}.scale is {list(scale.shape)}; FA scales are [heads, 1]")
            elif scale.dtype != torch.float32:
                err(f"{where}.scale is {scale.dtype}; FA scales are float32")
            elif not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                err(f"{where}.scale must be positive and finite")
            if offset.dtype != torch.int8 or offset.shape != scale.shape:
                err(f"{where}.offset is {offset.dtype} {list(offset.shape)}; INT8 FA offsets are int8 "
                    f"{list(scale.shape)}")
            elif bool(offset.abs().sum() > 0):
                err(f"{where}.offset is not zero: the engine dequantizes with the scale alone")
        k, v = present[f"{attention}.fa_k.scale"], present[f"{attention}.fa_v.scale"]
        if k.shape != v.shape:
            err(f"{attention}: fa_k.scale {list(k.shape)} and fa_v.scale {list(v.shape)} differ; both are "
                f"[num_kv_heads, 1]")
    return findings
