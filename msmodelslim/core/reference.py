"""The float model's activations beside the quantized model's, for GPTAQ (quantizer/gptaq.py).

Calibration then runs on the quantized model's hidden states (`spec.calibration.next_block_inputs: quantized`),
and a second stream carries the float model's from block to block. It walks the blocks through the adapter's own
generators, like the quantized stream, so whatever the model adds between blocks (a vision tower's output, DeepStack
features) reaches it as the model computes it; a vision tower quantized in the same run gives both streams its
quantized output, as the adapter serves it.

On a block where a processor pairs (`Processor.needs_reference`), the block is copied once, still in float, just
before that processor attaches its hooks; for each batch the copy forwards the float stream (the processor's hooks
on the copy take the float model's linear inputs), then the block itself forwards the quantized stream. The copy's
outputs move the float stream on. A block no processor pairs on forwards the float stream through itself before
any processor changes it. Cost: one more forward per block and per pairing step, one float copy of one block, one
more hidden state per batch (spilled to disk with the others when they are).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from msmodelslim.core.activations import ActivationSpill
from msmodelslim.core.walk import BatchWalks
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.processor.base import Processor


@dataclass
class ReferenceStream(BatchWalks):
    """Per live batch, the float model's own walk through the blocks (an adapter generator, so whatever it adds
    between blocks, e.g. DeepStack's visual features, is added to this stream too) and its current request, whose
    inputs are the float model's; spilled to disk with the quantized stream when that is."""

    spill: Optional[ActivationSpill] = None

    def forward(self, module: nn.Module, index: int) -> Any:
        """`module` (the block, or its float copy) on batch `index`'s float-model inputs."""
        request = self.requests[index]
        output = module(*request.args, **request.kwargs)
        if self.spill is not None:
            self.spill.evict(request.args[0])
            self.spill.move_to_disk(block_hidden_state(output))
        return output

    @torch.no_grad()
    def forward_all(self) -> list:
        """Each batch's output of the block as it is (float: before any processor ran)."""
        return [self.forward(r.module, i) for i, r in enumerate(self.requests)]

    @classmethod
    def for_one_block(cls, requests: list) -> "ReferenceStream":
        """A stream over one block only, starting from its current inputs (the dry run's timed block)."""
        return cls([None] * len(requests), list(requests))

    def move_to_disk(self, spill: ActivationSpill) -> None:
        self.spill = spill
        super().move_to_disk(spill)


@dataclass
class Pairing:
    """Called before the block's forward of each batch: the float copy forwards the same batch of the float
    stream, with `processor`'s hooks on the copy taking its linear inputs."""

    stream: ReferenceStream
    float_block: nn.Module
    processor: Processor
    block_name: str
    outputs: list = field(default_factory=list)

    def __call__(self, index: int, request) -> None:
        with self.processor.watch_reference(self.block_name, self.float_block):
            self.outputs.append(self.stream.forward(self.float_block, index))
