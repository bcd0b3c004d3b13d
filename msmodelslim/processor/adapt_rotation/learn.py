"""Learning the residual stream's rotation from calibration activations (adapt_rotation stage 1).

QuaRot rotates the residual stream by a fixed random Hadamard matrix Q₀. Here Q starts there and is improved on
the rows X that the quantized linears will read (norm inputs, normalised, with the norm's gain folded away as
QuaRot folds it), to lower the per-token quantization error

    E(Q) = ‖X·Q − quant(X·Q)‖²_F,   quant = symmetric per-token round to nearest (the kernel's own rule),

by alternating two minimisations, as Iterative Quantization does for binary codes (Gong & Lazebnik, "Iterative
Quantization: A Procrustean Approach to Learning Binary Codes", CVPR 2011):
1. with Q fixed, B = quant(X·Q) (for each token's scale, round to nearest is the closest grid point);
2. with B fixed, the orthogonal R minimising ‖X·Q·R − B‖_F is the polar factor of (X·Q)ᵀ·B (the orthogonal
   Procrustes problem, Schönemann 1966): with (X·Q)ᵀ·B = U·Σ·Vᵀ, R = U·Vᵀ; then Q ← Q·R.
The established tool takes the same polar factor by Newton–Schulz iterations; here it is the exact one, from an
SVD in float64. A token's scale follows its largest value, so step 1 may raise E a little after step 2 lowered
it: the Q of the lowest E seen is kept. With block_size b, Q is block diagonal and stays so: once B is fixed the
error separates over column blocks, and each block gets its own polar factor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from msmodelslim.quantizer.primitives import quantize_per_token_dynamic


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal U·Vᵀ of m = U·Σ·Vᵀ: the rotation R maximising trace(Rᵀ·m), i.e. minimising ‖A·R − B‖_F for
    m = Aᵀ·B."""
    u, _, vh = torch.linalg.svd(m.double())
    return u @ vh


ROWS_PER_CHUNK = 8192  # rows rotated and quantized at a time: the temporaries stay a fraction of the rows kept


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.split(x, ROWS_PER_CHUNK)


def quantization_error(x: torch.Tensor, q: torch.Tensor, bits: int) -> float:
    """‖X·Q − quant(X·Q)‖² / ‖X·Q‖²: the relative per-token quantization error of the rotated rows."""
    error = total = 0.0
    for chunk in _chunks(x):
        a = chunk @ q
        error += float((a - quantize_per_token_dynamic(a, bits)).square().sum())
        total += float(a.square().sum())
    return error / max(total, 1e-30)


def _alternation(x: torch.Tensor, q: torch.Tensor, bits: int, block: int) -> tuple[float, torch.Tensor]:
    """(E(Q)/‖X·Q‖², Q·R): B = quant(X·Q), the relative error of Q read off the same codes, and Q·R with R the
    (block-diagonal) polar factor of (X·Q)ᵀ·B, the sum of its blocks' products accumulated over chunks of rows."""
    size = q.shape[0]
    products = torch.zeros(size // block, block, block, dtype=torch.float64)
    error = total = 0.0
    for chunk in _chunks(x):
        a = chunk @ q
        b = quantize_per_token_dynamic(a, bits)
        error += float((a - b).square().sum())
        total += float(a.square().sum())
        a, b = a.reshape(len(a), size // block, block), b.reshape(len(b), size // block, block)
        products += torch.einsum("tki,tkj->kij", a, b).double()
    following = (q.double() @ torch.block_diag(*[polar_factor(m) for m in products])).to(q.dtype)
    return error / max(total, 1e-30), following


def procrustes_step(x: torch.Tensor, q: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """One alternation: B = quant(X·Q), then Q·R with R the (block-diagonal) polar factor of (X·Q)ᵀ·B."""
    return _alternation(x, q, bits, block)[1]


@dataclass
class LearnedRotation:
    rotation: torch.Tensor  # [hidden, hidden], orthogonal, float64
    errors: list[float] = field(default_factory=list)  # E/‖XQ‖² before the first step and after each
    best_step: int = 0


def learn_rotation(x: torch.Tensor, start: torch.Tensor, bits: int, steps: int, block: int) -> LearnedRotation:
    """The rotation of the lowest per-token `bits`-bit error over `steps` alternations from `start` (orthogonal,
    block diagonal with blocks of `block`), on the rows `x` [tokens, hidden]."""
    x = x.float()
    q = start.float()
    errors: list[float] = []
    best, best_step = start.double(), 0
    for step in range(steps + 1):
        # each pass reads the error of Q and the next Q off the same codes; the last Q needs only its error
        error, following = _alternation(x, q, bits, block) if step < steps else (quantization_error(x, q, bits), q)
        errors.append(error)
        if error < errors[best_step]:
            best, best_step = q.double(), step
        q = following
    return LearnedRotation(_reorthogonalised(best, block), errors, best_step)


def _reorthogonalised(q: torch.Tensor, block: int) -> torch.Tensor:
    """q's nearest orthogonal matrix, block by block: the float32 products of the steps drift from orthogonality by
    ~1e-6, which the rotation of every weight would carry into the checkpoint."""
    size = q.shape[0]
    return torch.block_diag(*[polar_factor(q[i:i + block, i:i + block]) for i in range(0, size, block)])
