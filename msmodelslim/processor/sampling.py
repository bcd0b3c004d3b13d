"""Token rows kept from a calibration forward, for methods that search or tune on real inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowSample:
    """Every `stride`-th token's input row, in float32 (strided so memory stays a fraction of the data)."""

    stride: int = 8
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        self.rows.append(x.detach().reshape(-1, x.shape[-1])[:: self.stride].float().clone())

    @property
    def empty(self) -> bool:
        return not self.rows

    def merge(self, collective, features: int) -> None:
        """Every rank's rows in rank order: with contiguous data shares, the rows a single process keeps."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, features)
        merged = collective.gather_rows(rows)
        self.rows = [merged] if len(merged) else []

    def take(self, limit: int) -> torch.Tensor:
        """At most `limit` rows, evenly spread over everything kept (deterministic)."""
        rows = torch.cat(self.rows)
        if len(rows) > limit:
            rows = rows[torch.linspace(0, len(rows) - 1, limit).round().long()]
        return rows


@dataclass
class ThinnedRowSample:
    """Every `stride`-th token row in float32, the stride doubling (and the rows kept halved) whenever more than
    2·`limit` are held: memory stays within 2·limit rows however many tokens pass, the rows evenly spread over them."""

    limit: int
    stride: int = 1
    rows: list[torch.Tensor] = field(default_factory=list)
    _seen: int = 0  # tokens passed, so that each batch continues the stride where the last one stopped

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        offset = (-self._seen) % self.stride
        self._seen += len(flat)
        self.rows.append(flat[offset :: self.stride].float().clone())
        while sum(len(r) for r in self.rows) > 2 * self.limit:
            kept = torch.cat(self.rows)
            # the rows held are the tokens at multiples of the stride, so every other one leaves those at
            # multiples of twice the stride
            self.rows, self.stride = [kept[::2].clone()], self.stride * 2

    def take(self) -> torch.Tensor:
        """At most `limit` rows, evenly spread over everything kept (deterministic)."""
        return RowSample(rows=self.rows).take(self.limit)
