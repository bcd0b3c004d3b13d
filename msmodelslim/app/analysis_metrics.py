"""The sensitivity metrics of `msmodelslim analyze` (protocol.md §7.1), as plain tensor math.

Linear scope, from the calibration inputs x of one linear (every element of every token, pooled):

    std       max|x| / σ(x)                        how far the largest value sits from the bulk
    quantile  (2·max|x| / 254) / (Q3(x) − Q1(x))    one int8 step of a symmetric max-range grid, in IQR units
    kurtosis  E[(x − μ)⁴] / σ⁴                      Pearson's kurtosis: 3 for a Gaussian, large with outliers

σ is the population standard deviation. All three grow with activation outliers, which is what makes a linear's
input hard to quantize (SmoothQuant, Xiao et al. 2023; LLM.int8(), Dettmers et al. 2022).

Layer and attention scopes compare float and quantized outputs: mean squared error, averaged over the outputs
compared (`mean_squared_error`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

LINEAR_METRICS = ("std", "quantile", "kurtosis")
INT8_STEPS = 254  # a symmetric int8 grid spans 2·max|x| in 254 steps


@dataclass
class InputStatistics:
    """Running raw moments (float64) of every element a linear received; `keep_values` also keeps the elements
    themselves (the quantiles need them all: memory is 4 bytes per element of this block's calibration inputs)."""

    keep_values: bool = False
    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # Σx, Σx², Σx³, Σx⁴
    max_abs: float = 0.0
    values: list[np.ndarray] = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).to(torch.float64)
        self.count += flat.numel()
        power = torch.ones_like(flat)
        for k in range(4):
            power = power * flat
            self.sums[k] += float(power.sum())
        self.max_abs = max(self.max_abs, float(flat.abs().max())) if flat.numel() else self.max_abs
        if self.keep_values:
            self.values.append(x.detach().reshape(-1).float().cpu().numpy())

    def central_moments(self) -> tuple[float, float, float]:
        """(μ, m2, m4): the mean and the second and fourth central moments, from the raw sums."""
        n = self.count
        e1, e2, e3, e4 = (s / n for s in self.sums)
        m2 = e2 - e1 * e1
        m4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1 ** 4
        return e1, max(m2, 0.0), max(m4, 0.0)


def std_score(stats: InputStatistics) -> float:
    _, m2, _ = stats.central_moments()
    return _ratio(stats.max_abs, math.sqrt(m2))


def quantile_score(stats: InputStatistics) -> float:
    values = np.concatenate(stats.values).astype(np.float64)
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return _ratio(2 * stats.max_abs / INT8_STEPS, float(q3 - q1))


def kurtosis_score(stats: InputStatistics) -> float:
    _, m2, m4 = stats.central_moments()
    return _ratio(m4, m2 * m2)


def _ratio(numerator: float, denominator: float) -> float:
    """A constant input (zero spread) scores 0: nothing to clip, nothing to rank it for."""
    return numerator / denominator if denominator > 0 else 0.0


LINEAR_SCORES = {"std": std_score, "quantile": quantile_score, "kurtosis": kurtosis_score}


@dataclass
class MeanSquaredError:
    """Σ(a − b)² and the element count, accumulated over batches and outputs; `value` = their ratio."""

    total: float = 0.0
    count: int = 0

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        diff = reference.detach().double() - other.detach().double()
        self.total += float((diff * diff).sum())
        self.count += diff.numel()

    @property
    def value(self) -> Optional[float]:
        return self.total / self.count if self.count else None


def mean_of(errors: list[MeanSquaredError]) -> float:
    """The mean over outputs of each output's MSE (each linear counts once, whatever its width)."""
    values = [e.value for e in errors if e.value is not None]
    return sum(values) / len(values) if values else 0.0
