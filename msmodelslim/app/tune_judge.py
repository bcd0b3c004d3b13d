"""What `msmodelslim tune` asks of a checkpoint and what one evaluation says: the plan's `demand` (expectations,
each a target and a tolerance per data set) and the judgement of scores against it (protocol.md §7.2).

An expectation passes when `target - accuracy <= tolerance`, computed in Decimal as the established tool does
(so 0.1 + 0.2 vs 0.3 is not a float accident).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class TuneResult:
    """What one evaluation says. `goodness`: larger is better (ranks results that all pass, or all fail)."""

    passed: bool
    scores: dict[str, float]
    goodness: float
    detail: str = ""


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = "score"
    target: float = Field(gt=0)
    tolerance: float = Field(0, ge=0)

    def met_by(self, accuracy: float) -> bool:
        return Decimal(str(self.target)) - Decimal(str(accuracy)) <= Decimal(str(self.tolerance))


class Demand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expectations: list[Expectation] = Field(min_length=1)


def judge(expectations: list[Expectation], scores: dict[str, float]) -> TuneResult:
    """Fail-fast over the expectations, in order; goodness = the smallest margin (accuracy - target)."""
    margins = []
    for expectation in expectations:
        accuracy = scores[expectation.dataset]
        margins.append(accuracy - expectation.target)
        if not expectation.met_by(accuracy):
            return TuneResult(False, scores, min(margins),
                              f"{expectation.dataset}: {accuracy:g} < target {expectation.target:g} "
                              f"- tolerance {expectation.tolerance:g}")
    return TuneResult(True, scores, min(margins), "all expectations met")
