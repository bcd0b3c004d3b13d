"""The result type every format checker reports."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (the engine fails or computes garbage) | "warning" (valid, but an engine will not load it)
    message: str  # "<checklist item>: <what is wrong>"
