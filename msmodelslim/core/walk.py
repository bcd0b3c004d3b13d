"""Each calibration batch's walk through the blocks: the adapter's generator (`generate_model_forward`), which
embeds the batch, yields a request (module, args, kwargs) per block and takes the block's output back, and the
request it yielded for the current block. The runner keeps one walk per batch for the model being quantized, and
GPTAQ a second for the float model (core/reference.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from msmodelslim.core.activations import ActivationSpill


@dataclass
class BatchWalks:
    forwards: list = field(default_factory=list)  # one generator per live batch (None: a one-block walk)
    requests: list = field(default_factory=list)  # its request for the current block (None: its walk ended)

    def start(self, generator) -> None:
        """A new batch's walk, up to the first block's request."""
        self.forwards.append(generator)
        self.requests.append(next(generator))

    def advance(self, outputs: list) -> None:
        """The next block's request of each batch, from this block's outputs (one per live batch)."""
        for i, output in enumerate(outputs):
            try:
                self.requests[i] = None if self.forwards[i] is None else self.forwards[i].send(output)
            except StopIteration:
                self.requests[i] = None

    def keep(self, count: int) -> None:
        """The first `count` batches live on (the others were dropped by an early stop)."""
        for generator in self.forwards[count:]:
            if generator is not None:
                generator.close()
        del self.forwards[count:], self.requests[count:]

    def fast_forward(self, live_batches: int, finished_blocks: int, inputs: list[torch.Tensor]) -> None:
        """Resume: each live batch's walk stepped past the `finished_blocks` a killed run finished, with the hidden
        states it saved for the next block (a step only swaps args[0]; no block is computed). No inputs: nothing
        is left to calibrate."""
        self.keep(live_batches)
        if not inputs:
            self.requests = [None] * len(self.requests)
            return
        for i, generator in enumerate(self.forwards):
            for _ in range(finished_blocks):
                self.requests[i] = generator.send(inputs[i])

    def hidden_states(self) -> list[torch.Tensor]:
        """The current block's input hidden states, per live batch (what a resume checkpoint keeps)."""
        return [r.args[0] for r in self.requests if r is not None]

    def move_to_disk(self, spill: Optional[ActivationSpill]) -> None:
        for request in self.requests:
            if request is not None:
                spill.move_to_disk(request.args[0])
