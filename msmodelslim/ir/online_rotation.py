"""Online rotations of a linear's input (QuaRot, Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs", NeurIPS 2024, §4): orthogonal maps T applied to the input at run time where no weight upstream can absorb
them (the input of down_proj comes out of the gated activation; o_proj's mixes heads), while the linear's weight
absorbs Tᵀ offline:

    y = x·Wᵀ = (T x)·(W Tᵀ)ᵀ,   T orthogonal.

Each row of W transforms as an input does (W Tᵀ has rows T·w), so one function rotates both. Two forms, named as the
established writer names their tensors (protocol.md §4.4, "QuaRot online"):

- heads rotation, `heads_rotation` R [H, H] (o_proj): the input seen as [H heads, d], x' = Rᵀ·x (heads mixed,
  each head's channels kept apart);
- Kronecker rotation, `kronecker_rotation_m` R_m [m, m] and `kronecker_rotation_n` R_n [n, n] (down_proj, m·n = in):
  the input seen as X [m, n], X' = R_mᵀ·X·R_n, i.e. T = R_mᵀ ⊗ R_nᵀ, costing m + n multiply-adds per input element
  instead of m·n.

A rotated float linear keeps nn.Linear's forward: the rotation is a forward pre-hook installed first, so every hook
that an algorithm adds later (GPTQ's Hessian, observers, AWQ's statistics) sees the rotated input the quantized
layer will receive.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

HEADS_ROTATION = "heads_rotation"
KRONECKER_M = "kronecker_rotation_m"
KRONECKER_N = "kronecker_rotation_n"
ROTATION_TENSORS = (HEADS_ROTATION, KRONECKER_M, KRONECKER_N)
ORTHOGONALITY_TOLERANCE = 1e-4  # max |R·Rᵀ − I| of a float32 rotation


def kronecker_input(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Lᵀ·X·R for every row X [a, b] of x (last dimension a·b), i.e. x·(L ⊗ R): QuaRot's Kronecker rotation and
    FlatQuant's transform alike; differentiable in all three."""
    shape = x.shape
    grid = x.reshape(-1, left.shape[0], right.shape[0])
    return torch.matmul(left.T, torch.matmul(grid, right)).reshape(shape)


def rotate_input(x: torch.Tensor, rotation: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """T·x over the last dimension of x (rows of a weight alike); x unchanged when `rotation` is empty."""
    if not rotation:
        return x
    shape = x.shape
    if HEADS_ROTATION in rotation:
        r = rotation[HEADS_ROTATION].to(x.dtype)
        heads = x.reshape(-1, r.shape[0], shape[-1] // r.shape[0])
        return torch.matmul(r.T, heads).reshape(shape)
    return kronecker_input(x, rotation[KRONECKER_M].to(x.dtype), rotation[KRONECKER_N].to(x.dtype))


def inverse(rotation: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rotation undoing `rotation` (Tᵀ): each factor transposed."""
    return {name: matrix.T.contiguous() for name, matrix in rotation.items()}


def check_rotation(rotation: Mapping[str, torch.Tensor], in_features: int) -> None:
    """Either heads_rotation alone or the Kronecker pair; square, orthogonal, and fitting `in_features`;
    ValueError naming what is wrong."""
    names = set(rotation)
    if names not in ({HEADS_ROTATION}, {KRONECKER_M, KRONECKER_N}):
        raise ValueError(f"an online rotation is {HEADS_ROTATION} alone or {KRONECKER_M} with {KRONECKER_N}, got "
                         f"{sorted(names)}")
    for name, matrix in rotation.items():
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got {list(matrix.shape)}")
        m = matrix.double()
        error = float((m @ m.T - torch.eye(m.shape[0], dtype=torch.float64)).abs().max())
        if error > ORTHOGONALITY_TOLERANCE:
            raise ValueError(f"{name} is not orthogonal (max |R·Rᵀ − I| = {error:.2e}); the layer would not compute "
                             f"what was quantized")
    if HEADS_ROTATION in rotation:
        heads = rotation[HEADS_ROTATION].shape[0]
        if in_features % heads:
            raise ValueError(f"{HEADS_ROTATION} over {heads} heads does not divide the input size {in_features}")
    elif rotation[KRONECKER_M].shape[0] * rotation[KRONECKER_N].shape[0] != in_features:
        raise ValueError(f"{KRONECKER_M} [{rotation[KRONECKER_M].shape[0]}] times {KRONECKER_N} "
                         f"[{rotation[KRONECKER_N].shape[0]}] must equal the input size {in_features}")


def input_rotation(module: nn.Module) -> dict[str, torch.Tensor]:
    """The online rotation a linear (float or QuantLinear) applies to its input: {tensor name: matrix}, or {}."""
    return {name: getattr(module, name) for name in ROTATION_TENSORS if getattr(module, name, None) is not None}


def _rotate_first_argument(module: nn.Module, args: tuple) -> tuple:
    return (rotate_input(args[0], input_rotation(module)), *args[1:])


@torch.no_grad()
def attach_rotation(linear: nn.Linear, rotation: Mapping[str, torch.Tensor], rotate_weight: bool = True) -> None:
    """Make a float linear compute the same function behind an online rotation of its input: its weight becomes
    W·Tᵀ (unless `rotate_weight` is False: the weight is already W·Tᵀ, e.g. carried over from a rotated layer),
    the matrices become non-persistent buffers (the writers save them as the format says, not as the module's
    state), and a pre-hook rotates the input before every other hook."""
    if input_rotation(linear):
        raise ValueError(f"{type(linear).__name__} already has an online rotation; one per layer")
    check_rotation(rotation, linear.in_features)
    weight = linear.weight
    if rotate_weight:
        weight.copy_(rotate_input(weight.double(), {k: v.double() for k, v in rotation.items()}).to(weight.dtype))
    for name, matrix in rotation.items():
        linear.register_buffer(name, matrix.to(device=weight.device, dtype=torch.float32).contiguous(),
                               persistent=False)
    linear.register_forward_pre_hook(_rotate_first_argument)


def unrotated_weight(linear: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W from a rotated layer's W·Tᵀ (for a layer written as a plain float layer): W·Tᵀ·T = W."""
    rotation = input_rotation(linear)
    if not rotation:
        return weight
    back = inverse({k: v.double() for k, v in rotation.items()})
    return rotate_input(weight.double(), back).to(weight.dtype)
