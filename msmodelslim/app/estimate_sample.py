"""What a dry run measures its pieces on (app/estimate.py, app/estimate_prior.py): the first batches, up to about
TIMED_TOKENS tokens or TIMED_BATCHES batches, and the bytes of the tensors they hold."""
from __future__ import annotations

from typing import Optional

import torch

TIMED_TOKENS = 2048  # a block is calibrated on the first batches up to about this many tokens
TIMED_BATCHES = 8


def timed_batches(batches: list[dict]) -> int:
    """How many of the first batches a measurement runs."""
    tokens = 0
    for i, batch in enumerate(batches):
        tokens += int(batch["input_ids"].numel())
        if tokens >= TIMED_TOKENS or i + 1 >= TIMED_BATCHES:
            return i + 1
    return len(batches)


def tensor_bytes(value, seen: Optional[set[int]] = None) -> int:
    """Bytes of the tensors in a nested args/kwargs structure, each storage once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    return 0
