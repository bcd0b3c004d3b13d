"""Hadamard matrices of the sizes real models have, and the random orthogonal rotations QuaRot builds from them.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I, so H/√n is orthogonal and spreads every
coordinate evenly over all others (what flattens outlier channels). Constructions used here:
- Sylvester: order 2^k, H_{2m} = [[H, H], [H, -H]].
- Paley I: order q+1 for a prime q ≡ 3 (mod 4).
- Paley II: order 2(q+1) for a prime q ≡ 1 (mod 4).
- Kronecker products: H_a ⊗ H_b is Hadamard of order a·b.
That covers e.g. 576 = 12·12·4, 1536 = 12·128, 3584 = 28·128, 5120 = 20·256 and every power of two. For an
order none of these reach, `rotation` falls back to a random orthogonal matrix (QR of a Gaussian): still exact
in float, but without the even spreading guarantee; the caller logs that.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod q (0 at 0, +1 on squares, −1 otherwise)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley_1(q: int) -> torch.Tensor:
    """Order q+1 (q ≡ 3 mod 4): H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew-symmetric."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley_2(q: int) -> torch.Tensor:
    """Order 2(q+1) (q ≡ 1 mod 4): expand the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] by
    0 → [[1, −1], [−1, −1]] and ±1 → ±[[1, 1], [1, −1]]."""
    m = q + 1
    c = torch.zeros(m, m, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


@lru_cache(maxsize=None)
def _hadamard(n: int) -> Optional[torch.Tensor]:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n & (n - 1) == 0:
        half = _hadamard(n // 2)
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    if n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley_1(n - 1)
    if n % 4 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley_2(n // 2 - 1)
    for a in range(2, int(n**0.5) + 1):
        if n % a == 0:
            left, right = _hadamard(a), _hadamard(n // a)
            if left is not None and right is not None:
                return torch.kron(left, right)
    return None


def hadamard(n: int) -> Optional[torch.Tensor]:
    """A ±1 Hadamard matrix of order n (float64), or None when no construction here reaches n."""
    matrix = _hadamard(n)
    return None if matrix is None else matrix.clone()


def random_rotation(n: int, seed: int) -> tuple[torch.Tensor, bool]:
    """(Q, is_hadamard): Q = H·diag(±1)/√n with random signs from `seed`, float64 and orthogonal; a random
    orthogonal matrix when no Hadamard matrix of order n is known here."""
    generator = torch.Generator().manual_seed(seed)
    h = _hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0), False
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return h * signs.unsqueeze(0) / n**0.5, True


def block_diagonal(block: torch.Tensor, repeats: int) -> torch.Tensor:
    return torch.block_diag(*([block] * repeats))
