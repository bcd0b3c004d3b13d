"""QuantLinear <-> ascendv1 tensors: names, dtypes, shapes and derived tensors (deq_scale, quant_bias, packing).

See the format notes in docs/ascendv1.md. `prefix` is the linear's module name; every returned tensor is
saved as `prefix.<suffix>`.
"""
from __future__ import annotations

import torch

from msmodelslim.ir.flat_transform import (CLIP_RATIO, FLAT_TENSORS, LEFT_TRANS, RIGHT_TRANS, check_flat_transform,
                                           flat_transform)
from msmodelslim.ir.lowrank import LOWRANK_L1, LOWRANK_L2, check_lowrank_pair
from msmodelslim.ir.online_rotation import ROTATION_TENSORS, check_rotation, input_rotation
from msmodelslim.ir.quant_linear import CODE_DTYPE, DUAL_SCALE, FLAT_SCHEMES, MX_SCHEMES, QuantLinear
from msmodelslim.ir.sparse_linear import W16A16S, SparseFloatLinear
from msmodelslim.quantizer.float_formats import e8m0_to_scale, pack_fp4_pairs, scale_to_e8m0, unpack_fp4_pairs
from msmodelslim.quantizer.scheme import Scheme

FLOAT = "FLOAT"
FLOAT_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- Derived tags: the established writer renames the type of a layer that carries extra tensors, `X_DYNAMIC` ->
# `X_<MARK>_DYNAMIC` and any other `X` -> `X_<MARK>`: SVDQuant's low-rank pair (formats.md A.4.4) and FlatQuant's
# transform (A.4.8) ----------------------------------------------------------------------------------------------
def _marked(tag: str, mark: str) -> str:
    return tag[: -len("_DYNAMIC")] + f"_{mark}_DYNAMIC" if tag.endswith("_DYNAMIC") else f"{tag}_{mark}"


def _split_marked(tag: str, mark: str) -> tuple[str, bool]:
    if tag.endswith(f"_{mark}_DYNAMIC"):
        return tag[: -len(f"_{mark}_DYNAMIC")] + "_DYNAMIC", True
    if tag.endswith(f"_{mark}"):
        return tag[: -len(f"_{mark}")], True
    return tag, False


def svd_tag(tag: str) -> str:
    """The type of a linear that holds svd_lowrank_l1/l2 (e.g. W4A4_MXFP4_SVD, W8A8_SVD_DYNAMIC)."""
    return _marked(tag, "SVD")


def split_svd_tag(tag: str) -> tuple[str, bool]:
    """(inner type, whether the layer carries the low-rank pair): the inverse of `svd_tag`."""
    return _split_marked(tag, "SVD")


def flat_tag(tag: str) -> str:
    """The type of a linear behind FlatQuant's transform (W4A4_FLATQUANT_DYNAMIC: left_trans, right_trans and
    clip_ratio beside its own tensors)."""
    return _marked(tag, "FLATQUANT")


def split_flat_tag(tag: str) -> tuple[str, bool]:
    """(inner type, whether the layer carries FlatQuant's transform): the inverse of `flat_tag`."""
    return _split_marked(tag, "FLATQUANT")


# ---- int4 packing ------------------------------------------------------------------------------------------
def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """W4A8_DYNAMIC layout: [N, K] int4 codes -> [N/2, K] int8; row 2j in the low nibble, 2j+1 in the high."""
    if q.shape[0] % 2:
        raise ValueError("W4A8_DYNAMIC needs an even number of output rows")
    lo, hi = q[0::2].to(torch.int16), q[1::2].to(torch.int16)
    return ((hi << 4) | (lo & 0x0F)).to(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int16)
    lo, hi = b & 0x0F, (b >> 4) & 0x0F
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1]).to(torch.int8)


def pack_int4_int32(q: torch.Tensor) -> torch.Tensor:
    """W4A16 (compressed-tensors layout): [N, K] int4 codes -> [N, K/8] int32, stored as q+8, low bits first."""
    if q.shape[1] % 8:
        raise ValueError("W4A16 packing needs the input size to be a multiple of 8")
    u = (q.to(torch.int64) + 8).reshape(q.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (u << shifts).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4_int32(packed: torch.Tensor) -> torch.Tensor:
    u = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (u.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - 8).reshape(packed.shape[0], -1).to(torch.int8)


# ---- deq_scale encoding ------------------------------------------------------------------------------------
def encode_deq_scale(deq_scale: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """float32 for bf16 models; otherwise the float32 bit pattern read as int32 and widened to int64."""
    deq_scale = deq_scale.float().contiguous()
    if model_dtype == torch.bfloat16:
        return deq_scale
    return deq_scale.view(torch.int32).to(torch.int64)


def decode_deq_scale(stored: torch.Tensor) -> torch.Tensor:
    if stored.dtype == torch.int64:
        return stored.to(torch.int32).view(torch.float32)
    return stored.float()


def scale_bias(dequantized: torch.Tensor, row_parallel: bool) -> torch.Tensor:
    """W4A8 kernel constant 8·Σ_k W_f[n,k]: [N,1] for column-parallel, 16 partial sums [N,16] for row-parallel."""
    if not row_parallel:
        return 8 * dequantized.sum(dim=1, keepdim=True)
    if dequantized.shape[1] % 16:
        raise ValueError("row-parallel W4A8 layers need an input size divisible by 16")
    return 8 * dequantized.reshape(dequantized.shape[0], 16, -1).sum(dim=-1)


# ---- writer side -------------------------------------------------------------------------------------------
def linear_tensors(ir: QuantLinear, model_dtype: torch.dtype,
                   row_parallel: bool) -> dict[str, tuple[torch.Tensor, str | None]]:
    """{suffix: (tensor, type tag)} for one quantized linear; tag None for a tensor written without a description
    entry (an online rotation)."""
    tag = ir.scheme.value
    out: dict[str, tuple[torch.Tensor, str | None]] = {}
    zeros = torch.zeros_like(ir.weight_scale)
    if ir.scheme in (Scheme.W8A8, Scheme.W8A8_MIX, Scheme.W8A8S):  # W8A8S: the same tensors, sparse codes
        w_scale = ir.weight_scale[:, 0]
        deq = (ir.input_scale * w_scale).float()
        bias = ir.bias if ir.bias is not None else torch.zeros_like(deq)
        rowsum = ir.qweight.to(torch.int64).sum(dim=1).float()
        quant_bias = torch.round(bias / deq - ir.input_offset * rowsum).to(torch.int32)
        out["weight"] = (ir.qweight, tag)
        out["quant_bias"] = (quant_bias, tag)
        out["input_scale"] = (ir.input_scale.reshape(1).float(), tag)
        out["input_offset"] = (ir.input_offset.reshape(1).float(), tag)
        out["deq_scale"] = (encode_deq_scale(deq, model_dtype), tag)
        if ir.scheme == Scheme.W8A8_MIX:  # the dynamic (prefill) kernel's weight scale, as W8A8_DYNAMIC stores it
            out["weight_scale"] = (ir.weight_scale, tag)
            out["weight_offset"] = (zeros, tag)
    elif ir.scheme in (Scheme.W8A8_DYNAMIC, Scheme.W8A16):
        out["weight"] = (ir.qweight, tag)
        out["weight_scale"] = (ir.weight_scale, tag)
        out["weight_offset"] = (ir.weight_offset if ir.scheme == Scheme.W8A16 else zeros, tag)
    elif ir.scheme == Scheme.W4A8_DYNAMIC:
        out["weight"] = (pack_int4_rows(ir.qweight), tag)
        out["weight_scale"] = (ir.weight_scale, tag)
        out["weight_offset"] = (zeros, tag)
        out["scale_bias"] = (scale_bias(ir.dequantized_weight(), row_parallel), tag)
    elif ir.scheme == Scheme.W4A4_DYNAMIC:  # formats.md A.4.7: int4 codes one per int8 byte, f32 [N, 1] scales
        out["weight"] = (ir.qweight, tag)
        out["weight_scale"] = (ir.weight_scale, tag)
        out["weight_offset"] = (zeros, tag)
    elif ir.scheme == Scheme.W4A16:
        # The layout vLLM-Ascend reads for W4A16 (compressed-tensors packing, symmetric). The scale stays float32:
        # the engine casts it to its parameter dtype on load, and our reader keeps full precision.
        out["weight_packed"] = (pack_int4_int32(ir.qweight), tag)
        out["weight_scale"] = (ir.weight_scale, tag)
        out["weight_shape"] = (torch.tensor([ir.out_features, ir.in_features], dtype=torch.int64), tag)
    elif ir.scheme == Scheme.W8A8FP8_DYNAMIC:  # formats.md A.4.9: float8 codes, per-channel f32 scale, zero offset
        out["weight"] = (ir.qweight, tag)
        out["weight_scale"] = (ir.weight_scale, tag)
        out["weight_offset"] = (zeros, tag)
    elif ir.scheme in MX_SCHEMES:  # formats.md A.4.10: E8M0 scales as bytes, FP4 two codes per byte
        fp4 = ir.qweight.dtype == torch.uint8
        out["weight"] = (pack_fp4_pairs(ir.qweight) if fp4 else ir.qweight, tag)
        out["weight_scale"] = (scale_to_e8m0(ir.weight_scale), tag)
        if ir.weight_dual_scale is not None:  # the established writer's [N, K/D, 1] float32 (formats.md A.4.10)
            out[DUAL_SCALE] = (ir.weight_dual_scale.float().unsqueeze(-1), tag)
    else:  # pragma: no cover - Scheme is closed
        raise ValueError(f"no ascendv1 layout for {ir.scheme}")
    if ir.bias is not None:  # DUALSCALE tags its bias with its own type, as the established writer does
        out["bias"] = (ir.bias.float(), tag if ir.scheme == Scheme.W4A4_MXFP4_DUALSCALE else FLOAT)
    if ir.svd_rank is not None:  # the quantized tensors are the residual's: their type gets _SVD; the pair is FLOAT
        out = {suffix: (tensor, t if t == FLOAT else svd_tag(t)) for suffix, (tensor, t) in out.items()}
        out[LOWRANK_L1] = (ir.svd_lowrank_l1.to(model_dtype), FLOAT)
        out[LOWRANK_L2] = (ir.svd_lowrank_l2.to(model_dtype), FLOAT)
    for suffix, matrix in input_rotation(ir).items():  # float32, without a description entry (protocol.md §4.4)
        out[suffix] = (matrix.float().contiguous(), None)
    flat = flat_transform(ir)
    # formats.md A.4.8: the layer's tensors get the _FLATQUANT type (a float bias stays FLOAT); L and R are written
    # in the model's dtype, in which the engine holds them
    if flat:
        out = {suffix: (tensor, t if t == FLOAT else flat_tag(t)) for suffix, (tensor, t) in out.items()}
        tag = flat_tag(ir.scheme.value)
        out[LEFT_TRANS] = (flat[LEFT_TRANS].to(model_dtype).contiguous(), tag)
        out[RIGHT_TRANS] = (flat[RIGHT_TRANS].to(model_dtype).contiguous(), tag)
        out[CLIP_RATIO] = (flat[CLIP_RATIO].float().reshape(1), tag)
    return out


def sparse_float_tensors(ir: SparseFloatLinear, weight_dtype: torch.dtype, bias_dtype: torch.dtype
                         ) -> dict[str, tuple[torch.Tensor, str]]:
    """W16A16S: the pruned float weight in the model's dtype and the bias, both tagged W16A16S (the established
    writer's layout; its documentation also names a `scale` tensor, which it never writes)."""
    out = {"weight": (ir.weight.to(weight_dtype), W16A16S)}
    if ir.bias is not None:
        out["bias"] = (ir.bias.to(bias_dtype), W16A16S)
    return out


# ---- reader side -------------------------------------------------------------------------------------------
# The tensors `linear_from_tensors` needs for each type (bias is optional everywhere).
REQUIRED_SUFFIXES: dict[str, frozenset[str]] = {
    Scheme.W8A8.value: frozenset({"weight", "quant_bias", "input_scale", "input_offset", "deq_scale"}),
    Scheme.W8A8S.value: frozenset({"weight", "quant_bias", "input_scale", "input_offset", "deq_scale"}),
    Scheme.W8A8_MIX.value: frozenset({"weight", "quant_bias", "input_scale", "input_offset", "deq_scale",
                                      "weight_scale", "weight_offset"}),
    Scheme.W8A8_DYNAMIC.value: frozenset({"weight", "weight_scale", "weight_offset"}),
    Scheme.W8A16.value: frozenset({"weight", "weight_scale", "weight_offset"}),
    Scheme.W4A8_DYNAMIC.value: frozenset({"weight", "weight_scale", "weight_offset"}),
    Scheme.W4A4_DYNAMIC.value: frozenset({"weight", "weight_scale", "weight_offset"}),
    Scheme.W4A16.value: frozenset({"weight_packed", "weight_scale", "weight_shape"}),
    W16A16S: frozenset({"weight"}),
    Scheme.W8A8FP8_DYNAMIC.value: frozenset({"weight", "weight_scale", "weight_offset"}),
    **{s.value: frozenset({"weight", "weight_scale"}) for s in MX_SCHEMES},
    Scheme.W4A4_MXFP4_DUALSCALE.value: frozenset({"weight", "weight_scale", DUAL_SCALE}),
}
# The established writer's spelling of FP8 dynamic (formats.md A.4.9): read as the engine's W8A8FP8_DYNAMIC.
TAG_ALIASES = {"WFP8AFP8_DYNAMIC": Scheme.W8A8FP8_DYNAMIC.value}
REQUIRED_SUFFIXES.update({alias: REQUIRED_SUFFIXES[tag] for alias, tag in TAG_ALIASES.items()})
# Every quantized type with the low-rank pair (W16A16S is a float layer: no SVD variant).
REQUIRED_SUFFIXES.update({svd_tag(tag): needed | {LOWRANK_L1, LOWRANK_L2}
                          for tag, needed in list(REQUIRED_SUFFIXES.items()) if tag != W16A16S})
# FlatQuant: the int4 dynamic and the MXFP4 types behind the transform.
FLAT_INNER_TAGS = tuple(scheme.value for scheme in FLAT_SCHEMES)
REQUIRED_SUFFIXES.update({flat_tag(inner): REQUIRED_SUFFIXES[inner] | set(FLAT_TENSORS) for inner in FLAT_INNER_TAGS})


def linear_from_tensors(tag: str, t: dict[str, torch.Tensor]) -> QuantLinear | SparseFloatLinear:
    """Rebuild the IR from saved tensors alone (suffix -> tensor), inverting `linear_tensors` (and
    `sparse_float_tensors`)."""
    if tag == W16A16S:
        bias = t.get("bias")
        return SparseFloatLinear(t["weight"].float(), None if bias is None else bias.float())
    inner, flat = split_flat_tag(tag)
    if flat:  # the inner type's layer behind the transform
        ir = _linear_from_own_tensors(inner, t)
        transform = {name: t[name].float() for name in FLAT_TENSORS}
        check_flat_transform(transform, ir.in_features, mxfp4=inner == Scheme.W4A4_MXFP4.value)
        ir.left_trans, ir.right_trans = transform[LEFT_TRANS], transform[RIGHT_TRANS]
        ir.clip_ratio = transform[CLIP_RATIO].reshape(1)
        return ir
    inner, lowrank = split_svd_tag(tag)
    if lowrank:  # the inner type's layer, computing the float low-rank branch on top
        ir = linear_from_tensors(inner, t)
        if not isinstance(ir, QuantLinear):
            raise ValueError(f"{tag}: {inner} has no SVD variant")
        l1, l2 = t[LOWRANK_L1].float(), t[LOWRANK_L2].float()
        check_lowrank_pair(l1, l2, ir.out_features, ir.in_features)
        ir.svd_lowrank_l1, ir.svd_lowrank_l2 = l1, l2
        return ir
    ir = _linear_from_own_tensors(tag, t)
    rotation = {name: t[name].float() for name in ROTATION_TENSORS if name in t}
    if rotation:  # QuaRot's online rotation of the input, saved beside the layer's tensors
        check_rotation(rotation, ir.in_features)
        for name, matrix in rotation.items():
            setattr(ir, name, matrix)
    return ir


def _linear_from_own_tensors(tag: str, t: dict[str, torch.Tensor]) -> QuantLinear:
    scheme = Scheme(TAG_ALIASES.get(tag, tag))
    bias = t.get("bias")
    if scheme == Scheme.W8A8FP8_DYNAMIC:
        scale = t["weight_scale"].float()
        return QuantLinear(scheme, t["weight"], scale, torch.zeros_like(scale), bias)
    if scheme in MX_SCHEMES:
        scale = e8m0_to_scale(t["weight_scale"])
        codes = unpack_fp4_pairs(t["weight"]) if CODE_DTYPE[scheme] == torch.uint8 else t["weight"]
        dual = None
        if scheme == Scheme.W4A4_MXFP4_DUALSCALE:  # [N, K/D, 1] -> [N, K/D]; D = K / its width
            stored = t[DUAL_SCALE]
            if stored.dim() != 3 or stored.shape[-1] != 1:
                raise ValueError(f"{DUAL_SCALE} must be [N, K/D, 1], got {list(stored.shape)}")
            dual = stored.float().squeeze(-1)
        return QuantLinear(scheme, codes, scale, torch.zeros_like(scale), bias, weight_dual_scale=dual)
    if scheme in (Scheme.W8A8, Scheme.W8A8S):
        q = t["weight"]
        s_in, o_in = t["input_scale"].float(), t["input_offset"].float()
        deq = decode_deq_scale(t["deq_scale"])
        w_scale = (deq / s_in).reshape(-1, 1)
        rowsum = q.to(torch.int64).sum(dim=1).float()
        bias = (t["quant_bias"].float() + o_in * rowsum) * deq
        return QuantLinear(scheme, q, w_scale, torch.zeros_like(w_scale), bias, s_in, o_in)
    if scheme == Scheme.W8A8_MIX:
        q, s_in, o_in = t["weight"], t["input_scale"].float(), t["input_offset"].float()
        if bias is None:  # no float bias written: the one folded into quant_bias (zero for bias-free layers)
            deq = decode_deq_scale(t["deq_scale"])
            bias = (t["quant_bias"].float() + o_in * q.to(torch.int64).sum(dim=1).float()) * deq
        scale = t["weight_scale"].float()
        return QuantLinear(scheme, q, scale, torch.zeros_like(scale), bias, s_in, o_in)
    if scheme in (Scheme.W8A8_DYNAMIC, Scheme.W8A16, Scheme.W4A4_DYNAMIC):
        return QuantLinear(scheme, t["weight"], t["weight_scale"].float(), t["weight_offset"].float(), bias)
    if scheme == Scheme.W4A8_DYNAMIC:
        q = unpack_int4_rows(t["weight"])
        scale = t["weight_scale"].float()
        return QuantLinear(scheme, q, scale, t["weight_offset"].float(), bias)
    if scheme == Scheme.W4A16:
        n, k = (int(v) for v in t["weight_shape"])
        q = unpack_int4_int32(t["weight_packed"])[:, :k]
        scale = t["weight_scale"].float()
        return QuantLinear(scheme, q.reshape(n, k), scale, torch.zeros_like(scale), bias)
    raise ValueError(f"unsupported ascendv1 type {tag!r}")
