"""Observers collect activation statistics during calibration."""
from __future__ import annotations

import torch


class MinMaxObserver:
    """Running min and max over every element seen (per-tensor static activation ranges)."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().amin(), x.detach().float().amax()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min is not None
