"""FlatQuant's online input transform (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024): an
invertible Kronecker-factored matrix applied to a linear's input at run time, its inverse absorbed by the weight,
and a clipping ratio for the per-token int4 quantization that follows.

With the input size K = a·b (a ≤ b, the factor pair vLLM-Ascend's loader derives: `decompose_dim`), each token
x is seen as X [a, b] and transformed to X' = Lᵀ·X·R, i.e. x' = x·(L ⊗ R) on the flattened token. The weight
absorbs the inverse, y = x·Wᵀ = x'·(W·(L ⊗ R)⁻ᵀ)ᵀ, so each weight row w becomes L⁻¹·w·R⁻ᵀ (as a matrix [a, b]).
The kernel (aclnnFlatQuant) then quantizes x' per token with s = max|x'|·c / 7, c = `clip_ratio` in (0, 1].

Saved as ascendv1 names them (formats.md A.4.8): `left_trans` L [a, a] and `right_trans` R [b, b] in the model's
dtype, `clip_ratio` float32 [1] (the post-sigmoid ratio: vLLM-Ascend passes the stored value to the kernel as is).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from msmodelslim.ir.online_rotation import kronecker_input
from msmodelslim.quantizer.primitives import per_token_codes

LEFT_TRANS = "left_trans"
RIGHT_TRANS = "right_trans"
CLIP_RATIO = "clip_ratio"
FLAT_TENSORS = (LEFT_TRANS, RIGHT_TRANS, CLIP_RATIO)
MAX_CONDITION = 1e6  # a transform this ill-conditioned would not survive the model dtype's rounding


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


def check_flat_transform(transform: Mapping[str, torch.Tensor], in_features: int) -> None:
    """left_trans [a, a] and right_trans [b, b] with (a, b) = decompose_dim(in_features), finite and invertible,
    and one clip_ratio in (0, 1]; ValueError naming what is wrong."""
    missing = [name for name in FLAT_TENSORS if name not in transform]
    if missing:
        raise ValueError(f"a FlatQuant transform needs {', '.join(missing)}")
    a, b = decompose_dim(in_features)
    for name, size in ((LEFT_TRANS, a), (RIGHT_TRANS, b)):
        matrix = transform[name]
        if list(matrix.shape) != [size, size]:
            raise ValueError(f"{name} must be [{size}, {size}] for an input of {in_features} ({a} x {b}, the factor "
                             f"pair the engine's loader derives), got {list(matrix.shape)}")
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
def attach_flat_transform(linear: nn.Linear, transform: Mapping[str, torch.Tensor]) -> None:
    """Make a float linear compute the same function behind the transform of its input: the weight becomes
    W·(L ⊗ R)⁻ᵀ (in float64), the three tensors become non-persistent buffers (the writer saves them as the format
    says), and a pre-hook transforms the input before every hook added later (observers, GPTQ's Hessian)."""
    if flat_transform(linear):
        raise ValueError(f"{type(linear).__name__} already has a FlatQuant transform; one per layer")
    check_flat_transform(transform, linear.in_features)
    weight = linear.weight
    left, right = transform[LEFT_TRANS].double(), transform[RIGHT_TRANS].double()
    weight.copy_(transform_weight(weight.double(), left, right).to(weight.dtype))
    for name in FLAT_TENSORS:
        tensor = transform[name].detach().to(device=weight.device, dtype=torch.float32)
        linear.register_buffer(name, (tensor.reshape(1) if name == CLIP_RATIO else tensor).contiguous(),
                               persistent=False)
    linear.register_forward_pre_hook(_transform_first_argument)
