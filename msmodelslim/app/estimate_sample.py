"""What a dry run measures its pieces on (app/estimate.py, app/estimate_prior.py): the first batches, up to about
TIMED_TOKENS tokens or TIMED_BATCHES batches, and the bytes of the tensors they hold."""
from __future__ import annotations

from typing import Callable, Optional

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


def through_leading_blocks(adapter, model, leading: list[str], device, forwards: list, requests: list,
                           run: Callable[[str, object, list], list], as_stored: bool = False) -> list:
    """The requests advanced through the blocks before the first decoder layer (a vision-language model's vision
    tower): each loaded, run on the requests by `run(name, block, requests)`, and released, as the real walk does
    once. `forwards`: the batches' walks, one per request, sent each block's outputs."""
    for lead in leading:
        adapter.load_block(model, lead, device, as_stored=as_stored)
        outputs = run(lead, model.get_submodule(lead), requests)
        requests = [f.send(o) for f, o in zip(forwards, outputs)] + requests[len(outputs):]
        adapter.release_block(model, lead)
    return requests
