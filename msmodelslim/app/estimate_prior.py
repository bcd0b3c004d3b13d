"""The dry-run estimate of spec.prior's stages (app/estimate.py): each walks the float model once on its own data
before the main stage, then learns from what it kept (adapt_rotation stage 1).

Measured like the main stage: one decoder block is loaded and runs the stage's processors on its first batches;
the forward time is scaled by the stage's tokens and the blocks, the learning's by the processors' own measure
(`publish_cost`). The memory beyond the main run's resident set: a second copy of the non-block tables (the stage
walks a model of its own), the stage's activations in and out of a block, and the rows kept."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from msmodelslim.app.estimate_sample import tensor_bytes, through_leading_blocks, timed_batches
from msmodelslim.core.runner import process_block
from msmodelslim.model.interface import ProcessRequest

@dataclass
class PriorCost:
    seconds: float = 0.0
    memory_bytes: int = 0


def measure_prior(job, model: nn.Module, block_name: str, device: torch.device, blocks: int,
                  leading: list[str]) -> PriorCost:
    """`model`: the dry run's model with its non-block tables loaded; `block_name`: a decoder block (loaded, run and
    released here); `blocks`: how many decoder blocks the real walk visits; `leading`: the blocks before the first
    of them (a vision-language model's vision tower), run once here on the timed batches, as the walk runs them
    once, to give the decoder blocks their inputs."""
    adapter = job.adapter
    block_names = adapter.block_names(model)
    # the stage's own model loads the non-block tables again (the dry run's copy of them is what it reads)
    outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not p.is_meta and not any(n.startswith(b + ".") for b in block_names))
    cost = PriorCost()
    for stage in job.prior:
        batches = adapter.handle_dataset(stage.calibration, device)
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        timed = timed_batches(batches)
        timed_tokens = sum(int(b["input_ids"].numel()) for b in batches[:timed])
        forwards = [adapter.generate_model_forward(model, batch) for batch in batches[:timed]]
        requests = [next(f) for f in forwards]
        clock = time.perf_counter()
        requests = through_leading_blocks(adapter, model, leading, device, forwards, requests,
                                          lambda n, b, r: process_block(n, b, stage.processors, r))
        leading_s = time.perf_counter() - clock
        hidden = sum(tensor_bytes(r.args[0]) for r in requests) * tokens // max(timed_tokens, 1)
        clock = time.perf_counter()
        adapter.load_block(model, block_name, device)
        load_s = time.perf_counter() - clock
        block = model.get_submodule(block_name)
        # the first decoder block's inputs, fed to this one (decoder layers take the same shapes)
        requests = [ProcessRequest(block_name, block, r.args, r.kwargs) for r in requests]
        process_block(block_name, block, stage.processors, requests[:1])  # first calls pay one-time costs
        clock = time.perf_counter()
        process_block(block_name, block, stage.processors, requests)
        forward_s = time.perf_counter() - clock
        adapter.release_block(model, block_name)
        for generator in forwards:
            generator.close()
        learn_s, kept = 0.0, 0
        for processor in stage.processors:
            seconds, held = processor.publish_cost(tokens)
            learn_s, kept = learn_s + seconds, kept + held
        scale = tokens / max(timed_tokens, 1)
        cost.seconds += (load_s + forward_s * scale) * blocks + leading_s * scale + learn_s
        cost.memory_bytes = max(cost.memory_bytes, outside + 2 * hidden + kept)
    return cost
