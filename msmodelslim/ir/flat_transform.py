"""FlatQuant's online input transform (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024): an
invertible Kronecker-factored matrix applied to a linear's input at run time, its inverse absorbed by the weight,
and a clipping ratio for the per-token int4 quantization that follows.

With the input size K = a·b (a ≤ b, the factor pair vLLM-Ascend's loader derives: `decompose_dim`), each token
x is seen as X [a, b] and transformed to X' = Lᵀ·X·R, i.e. x' = x·(L ⊗ R) on the flattened token. The weight
absorbs the inverse, y = x·Wᵀ = x'·(W·(L ⊗ R)⁻ᵀ)ᵀ, so each weight row w becomes L⁻¹·w·R⁻ᵀ (as a matrix [a, b]).
The kernel (aclnnFlatQuant) then quantizes x' per token with s = max|x'|·c / 7, c = `clip_ratio` in (0, 1].

Saved as ascendv1 names them (formats.md A.4.8): `left_trans` L [a, a] and `right_trans` R [b, b] in the model's
dtype, `clip_ratio` float32 [1] (the post-sigmoid ratio: vLLM-Ascend passes the stored value to the kernel as is).

W4A4_MXFP4_FLATQUANT (vLLM-Ascend's scheme of that name) quantizes the transformed input to MXFP4 instead, in blocks
of 32 of the flattened token, after the same clipping (`clipped_mxfp4`). Its loader derives the pair otherwise
(`flat_dims`): no side may exceed 256, and a row-parallel layer (input split over tensor-parallel ranks: o_proj,
down_proj) gets the pair of K / max_supported_tp for its right factor, while its left factor must be block-diagonal
over max_supported_tp ranks, since each rank keeps only its own diagonal block of L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from msmodelslim.ir.online_rotation import kronecker_input
from msmodelslim.quantizer.float_formats import mx_fake_quantize
from msmodelslim.quantizer.primitives import per_token_codes

LEFT_TRANS = "left_trans"
RIGHT_TRANS = "right_trans"
CLIP_RATIO = "clip_ratio"
FLAT_TENSORS = (LEFT_TRANS, RIGHT_TRANS, CLIP_RATIO)
MAX_CONDITION = 1e6  # a transform this ill-conditioned would not survive the model dtype's rounding
MAX_SUPPORT_DIM = 256  # vLLM-Ascend's MXFP4 FlatQuant: the largest side of a transform its kernel takes
MAX_SUPPORTED_TP = 4  # quant_model_description's max_supported_tp, written as the loader's default


def decompose_dim(n: int) -> tuple[int, int]:
    """(a, b) with a·b = n, a ≤ b: n = p² − q² with the smallest p ≥ √n, a = p − q, b = p + q. This is vLLM-Ascend's
    search: the pair of equal parity closest together (12 -> (2, 6), not (3, 4)). No such pair exists when
    n ≡ 2 (mod 4), where the loader's search never ends: ValueError."""
    if n < 1 or n % 4 == 2:
        raise ValueError(f"an input size of {n} has no FlatQuant factor pair (vLLM-Ascend's loader needs a·b = {n} "
                         f"with a and b of equal parity, which does not exist for sizes that are 2 mod 4)")
    p = math.isqrt(n)
    if p * p < n:
        p += 1
    while True:
        q = math.isqrt(p * p - n)
        if q * q == p * p - n:
            return p - q, p + q
        p += 1


def mxfp4_decompose_dim(n: int, shards: int = 1) -> tuple[int, int]:
    """vLLM-Ascend's pair for W4A4_MXFP4_FLATQUANT: `decompose_dim`'s (a, b), unless b exceeds 256 (ValueError: the
    loader refuses) or a·shards does (then (256, shards·n/256))."""
    a, b = decompose_dim(n)
    if b > MAX_SUPPORT_DIM:
        raise ValueError(f"an input size of {n} gives a FlatQuant factor pair ({a}, {b}) with a side above "
                         f"{MAX_SUPPORT_DIM}, which vLLM-Ascend's W4A4_MXFP4_FLATQUANT loader refuses")
    if a * shards > MAX_SUPPORT_DIM:
        if (shards * n) % MAX_SUPPORT_DIM:
            raise ValueError(f"an input size of {n} over {shards} rank(s) has no W4A4_MXFP4_FLATQUANT factor pair: "
                             f"the loader's fallback ({MAX_SUPPORT_DIM}, {shards}·{n}/{MAX_SUPPORT_DIM}) is not whole")
        return MAX_SUPPORT_DIM, shards * n // MAX_SUPPORT_DIM
    return a, b


@dataclass(frozen=True)
class FlatDims:
    """The transform's shape for one linear: L [left, left], block-diagonal over `left_blocks` ranks, R [right,
    right]."""

    left: int
    right: int
    left_blocks: int = 1


def flat_dims(in_features: int, mxfp4: bool = False, row_parallel: bool = False,
              shards: int = MAX_SUPPORTED_TP) -> FlatDims:
    """The pair the engine's loader derives for a linear of `in_features` inputs (ValueError where it has none).
    W4A4_FLATQUANT_DYNAMIC: `decompose_dim`. W4A4_MXFP4_FLATQUANT: `mxfp4_decompose_dim` of the whole input for a
    column-parallel linear; for a row-parallel one the right side is that of in_features / `shards` (the input
    one rank holds, at the largest tensor parallelism the checkpoint supports) and L is block-diagonal over the
    ranks."""
    if not mxfp4:
        return FlatDims(*decompose_dim(in_features))
    if not row_parallel:
        return FlatDims(*mxfp4_decompose_dim(in_features))
    if in_features % shards:
        raise ValueError(f"a row-parallel input of {in_features} does not split over max_supported_tp {shards} ranks")
    right = mxfp4_decompose_dim(in_features // shards, shards)[1]
    left = in_features // right
    if left * right != in_features or left % shards:
        raise ValueError(f"a row-parallel input of {in_features} has no W4A4_MXFP4_FLATQUANT factor pair over "
                         f"{shards} ranks (right side {right})")
    return FlatDims(left, right, shards)


def allowed_pairs(in_features: int, mxfp4: bool) -> list[tuple[int, int]]:
    """The (left, right) shapes a saved transform may have: the loader's pair, or for MXFP4 either its
    column-parallel or its row-parallel pair (which one the layer is, its name tells the engine)."""
    pairs = []
    for row_parallel in ((False, True) if mxfp4 else (False,)):
        try:
            dims = flat_dims(in_features, mxfp4, row_parallel)
        except ValueError:
            continue
        pairs.append((dims.left, dims.right))
    return pairs


def is_block_diagonal(matrix: torch.Tensor, blocks: int) -> bool:
    """Whether every entry outside the `blocks` equal diagonal blocks is zero."""
    size = matrix.shape[0]
    if size % blocks:
        return False
    step = size // blocks
    mask = torch.block_diag(*[torch.ones(step, step, dtype=torch.bool)] * blocks)
    return not bool(matrix.detach().cpu()[~mask].any())


def transform_input(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Lᵀ·X·R for every token X [a, b] of x: the Kronecker product QuaRot's online rotation computes too."""
    return kronecker_input(x, left, right)


def transform_weight(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W·(L ⊗ R)⁻ᵀ: each row w becomes L⁻¹·w·R⁻ᵀ, so that the transformed input gives the same output."""
    return transform_input(weight, torch.linalg.inv(left).T, torch.linalg.inv(right).T)


def clipped_per_token_int4(x: torch.Tensor, clip_ratio: torch.Tensor) -> torch.Tensor:
    """What aclnnFlatQuant does to the transformed input: s_t = max|x_t|·c / 7, codes clamp(round(x / s_t), −8, 7),
    returned dequantized (codes · s_t) in float32."""
    codes, scale = per_token_codes(x, 4, clip_ratio)
    return codes.mul_(scale)


def clipped_mxfp4(x: torch.Tensor, clip_ratio: torch.Tensor) -> torch.Tensor:
    """The MXFP4 variant: each token clipped to ±c·max|x_t| (c = `clip_ratio`), then MXFP4 in blocks of 32 (E2M1
    elements, the OCP shared exponent, as W4A4_MXFP4's activations), returned dequantized in float32. The clip
    is the spec's reading of the closed kernel (formats.md A.4.8), the same range as the int4 variant's."""
    return mx_fake_quantize(symmetric_clip(x.float(), clip_ratio.float().reshape(-1)[0], -1), "fp4_e2m1")


def symmetric_clip(x: torch.Tensor, clip: torch.Tensor, dim: int) -> torch.Tensor:
    """x limited to ±clip·max|x| along `dim` (clip broadcast against the maxima; differentiable in both)."""
    bound = x.abs().amax(dim=dim, keepdim=True) * clip
    return torch.maximum(torch.minimum(x, bound), -bound)


def check_flat_transform(transform: Mapping[str, torch.Tensor], in_features: int, mxfp4: bool = False) -> None:
    """left_trans [a, a] and right_trans [b, b] with (a, b) a pair the engine's loader derives for in_features
    (`allowed_pairs`), finite and invertible, and one clip_ratio in (0, 1]; ValueError naming what is wrong."""
    missing = [name for name in FLAT_TENSORS if name not in transform]
    if missing:
        raise ValueError(f"a FlatQuant transform needs {', '.join(missing)}")
    pairs = allowed_pairs(in_features, mxfp4)
    if not pairs:
        flat_dims(in_features, mxfp4)  # raises, saying why there is none
    shape = (transform[LEFT_TRANS].shape[0], transform[RIGHT_TRANS].shape[0])
    a, b = shape if shape in pairs else pairs[0]
    for name, size in ((LEFT_TRANS, a), (RIGHT_TRANS, b)):
        matrix = transform[name]
        if list(matrix.shape) != [size, size]:
            expected = " or ".join(f"{p} x {q}" for p, q in pairs)
            raise ValueError(f"{name} must be [{size}, {size}] for an input of {in_features} ({expected}, the factor "
                             f"pair(s) the engine's loader derives), got {list(matrix.shape)}")
        m = matrix.double()
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{name} holds non-finite values")
        condition = float(torch.linalg.cond(m))
        if not condition < MAX_CONDITION:
            raise ValueError(f"{name} is not invertible in practice (condition number {condition:.3g})")
    clip = transform[CLIP_RATIO]
    if clip.numel() != 1 or not 0 < float(clip.reshape(-1)[0]) <= 1:
        raise ValueError(f"{CLIP_RATIO} must be one value in (0, 1], got {clip.reshape(-1).tolist()[:4]}")


def flat_transform(module: nn.Module) -> dict[str, torch.Tensor]:
    """The FlatQuant transform a linear (float or QuantLinear) applies to its input: {tensor name: tensor}, or {}."""
    found = {name: getattr(module, name, None) for name in FLAT_TENSORS}
    return {} if any(t is None for t in found.values()) else found


def _transform_first_argument(module: nn.Module, args: tuple) -> tuple:
    return (transform_input(args[0], module.left_trans.to(args[0].dtype), module.right_trans.to(args[0].dtype)),
            *args[1:])


@torch.no_grad()
def attach_flat_transform(linear: nn.Linear, transform: Mapping[str, torch.Tensor], mxfp4: bool = False) -> None:
    """Make a float linear compute the same function behind the transform of its input: the weight becomes
    W·(L ⊗ R)⁻ᵀ (in float64), the three tensors become non-persistent buffers (the writer saves them as the format
    says), and a pre-hook transforms the input before every hook added later (observers, GPTQ's Hessian)."""
    if flat_transform(linear):
        raise ValueError(f"{type(linear).__name__} already has a FlatQuant transform; one per layer")
    check_flat_transform(transform, linear.in_features, mxfp4)
    weight = linear.weight
    left, right = transform[LEFT_TRANS].double(), transform[RIGHT_TRANS].double()
    weight.copy_(transform_weight(weight.double(), left, right).to(weight.dtype))
    for name in FLAT_TENSORS:
        tensor = transform[name].detach().to(device=weight.device, dtype=torch.float32)
        linear.register_buffer(name, (tensor.reshape(1) if name == CLIP_RATIO else tensor).contiguous(),
                               persistent=False)
    linear.register_forward_pre_hook(_transform_first_argument)
