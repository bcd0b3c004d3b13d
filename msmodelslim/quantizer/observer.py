"""Observers collect activation statistics during calibration."""
from __future__ import annotations

import torch

from msmodelslim.quantizer.primitives import scale_offset_from_minmax


class MinMaxObserver:
    """Running min and max over every element seen (per-tensor static activation ranges)."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # reduced in x's own dtype, then widened: the same float32 values without two full-size float32 copies
        x = x.detach()
        self.update_range(x.amin().float(), x.amax().float())

    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Widen the range by [lo, hi] (0-dim float32), e.g. by the extremes of per-channel ranges."""
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min is not None

    def merge(self, collective) -> None:
        """Min and max over every rank's data (exact: the same values a single process would keep)."""
        lo = self.min if self.seen else torch.tensor(float("inf"))
        hi = self.max if self.seen else torch.tensor(float("-inf"))
        lo, hi = collective.min(lo), collective.max(hi)
        if torch.isfinite(lo):
            self.min, self.max = lo, hi

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_offset_from_minmax(self.min, self.max, bits, symmetric)


class HistogramObserver:
    """`method: histogram`: a 2048-bin histogram of everything seen, and the clipping range [lo, hi] that
    minimises the expected squared quantization error over it, instead of the raw min/max that one outlier
    stretches.

    Error of a candidate range, per bin with centre c and count n: clipped values cost (c − hi)² or (lo − c)²,
    values inside cost the rounding noise step²/12 (step = (hi − lo)/(2^bits − 1)). Candidates scale the
    observed lo and hi independently by 40 ratios in (0, 1] (symmetric: one ratio on max|x|); the raw range
    is among them, so the result is never worse than min/max on this estimate. When a batch widens the range,
    the old counts are re-binned at their bin centres.
    """

    BINS = 2048
    RATIOS = torch.linspace(0.025, 1.0, 40, dtype=torch.float64)

    def __init__(self, symmetric: bool) -> None:
        self.symmetric = symmetric
        self.lo = self.hi = 0.0
        self.counts: torch.Tensor | None = None

    @property
    def seen(self) -> bool:
        return self.counts is not None

    def _centres(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.BINS
        return self.lo + width * (torch.arange(self.BINS, dtype=torch.float64) + 0.5)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1).cpu()  # torch.histogram runs on the CPU only
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if self.counts is not None and (lo < self.lo or hi > self.hi):
            centres = self._centres()
            lo, hi = min(lo, self.lo), max(hi, self.hi)
            self.counts = torch.histogram(centres, bins=self.BINS, range=(lo, hi), weight=self.counts)[0]
        elif self.counts is not None:
            lo, hi = self.lo, self.hi
        if hi == lo:
            hi = lo + 1e-8
        batch = torch.histogram(x, bins=self.BINS, range=(lo, hi))[0]
        self.counts = batch if self.counts is None else self.counts + batch
        self.lo, self.hi = lo, hi

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (lo, hi) pair the search considers."""
        if self.symmetric:
            m = max(-self.lo, self.hi) * self.RATIOS
            return -m, m
        a, b = torch.meshgrid(self.RATIOS, self.RATIOS, indexing="ij")
        return (self.lo * a).reshape(-1), (self.hi * b).reshape(-1)

    def expected_errors(self, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
        c, n = self._centres().unsqueeze(0), self.counts.unsqueeze(0)
        lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
        step = (hi - lo) / (2**bits - 1)
        err = torch.where(c < lo, (lo - c) ** 2, torch.where(c > hi, (c - hi) ** 2, step**2 / 12))
        return (err * n).sum(dim=1) / n.sum()

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.candidates()
        best = int(torch.argmin(self.expected_errors(lo, hi, bits)))
        return scale_offset_from_minmax(lo[best].float().reshape(1), hi[best].float().reshape(1), bits, symmetric)
