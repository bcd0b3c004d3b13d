"""The block walks behind `msmodelslim analyze`: each measures one decoder block at a time.

`walk_blocks` runs the calibration batches through the model block by block with the adapter's forward
generators (the runner's machinery, model/interface.py); in layer_wise mode only the current block's weights are
read, and they are dropped again before the next block is loaded. Each block's FLOAT output feeds the next
block, so a block is always measured on the inputs the float model gives it: its score is its own error, not the
error accumulated by the blocks before it.

  linear statistics   hooks on the selected linears' inputs during the float forward
  float vs processed  the block is copied, the copy goes through the scheme's processors (calibrated on the
                      same inputs, one forward per processor that needs data, as the runner does), and the
                      outputs of the selected modules (linears, or attention modules) of the float block and of
                      the copy are compared on the same inputs
  model-wise          the whole model is resident; each block in turn is replaced by its processed copy and
                      the model's final logits are compared with the float ones (one full forward per block
                      and batch)
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from msmodelslim.app.analysis_metrics import InputStatistics, MeanSquaredError, mean_of
from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger, progress_disabled
from msmodelslim.core.memory import heap_reused, release_free_heap
from msmodelslim.processor.base import Processor

log = get_logger("app.analyze")

# visit(block name, block, this block's requests) -> the block's float outputs, one per request
BlockVisit = Callable[[str, nn.Module, list], list]


def _relative(block_name: str, names: list[str]) -> list[str]:
    return [n[len(block_name) + 1 :] for n in names]


@torch.no_grad()
def _forward(block: nn.Module, request) -> object:
    return block(*request.args, **request.kwargs)


@torch.no_grad()
def walk_blocks(adapter, model: nn.Module, batches: list[dict], device: torch.device, layer_wise: bool,
                visit: BlockVisit) -> None:
    """Every block in order, each visited once with the float inputs of every batch."""
    forwards, requests = [], []
    for batch in batches:
        generator = adapter.generate_model_forward(model, batch)
        forwards.append(generator)
        requests.append(next(generator))
    block_names = adapter.block_names(model)
    for index, name in enumerate(tqdm(block_names, desc="analyze blocks", unit="block", disable=progress_disabled())):
        if layer_wise:
            adapter.load_block(model, name, device)
            if index + 1 < len(block_names):
                adapter.prefetch_block(model, block_names[index + 1])
        with heap_reused():  # every batch allocates the same temporaries (core/memory.py)
            outputs = visit(name, model.get_submodule(name), requests)
        for i, (generator, output) in enumerate(zip(forwards, outputs)):
            try:
                requests[i] = generator.send(output)
            except StopIteration:
                requests[i] = None
        if layer_wise:
            adapter.release_block(model, name)
        release_free_heap()


def linear_statistics_visit(patterns_match: Callable[[str], bool], keep_values: bool,
                            found: dict[str, InputStatistics]) -> BlockVisit:
    """Collect the input statistics of every linear whose full name `patterns_match` accepts into `found`."""
    def visit(block_name: str, block: nn.Module, requests: list) -> list:
        hooks = []
        for relative, module in block.named_modules():
            name = f"{block_name}.{relative}"
            if isinstance(module, nn.Linear) and patterns_match(name):
                stats = found[name] = InputStatistics(keep_values)
                hooks.append(module.register_forward_pre_hook(lambda _m, args, s=stats: s.update(args[0])))
        try:
            return [_forward(block, r) for r in requests]
        finally:
            for hook in hooks:
                hook.remove()
    return visit


@torch.no_grad()
def processed_copy(block_name: str, block: nn.Module, processors: list[Processor], requests: list) -> nn.Module:
    """A copy of the block as the scheme leaves it: each processor calibrates on the copy as the processors
    before it left it (its own forward of every batch), then rewrites it (smoothing, quantized linears, FA3)."""
    processed = copy.deepcopy(block)
    for processor in processors:
        processor.before_forward(block_name, processed)
        if processor.needs_calibration:
            for request in requests:
                _forward(processed, request)
        processor.after_forward(block_name, processed)
    return processed


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Capture:
    """Forward hooks keeping the latest output of each named module (relative names)."""

    def __init__(self, root: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = [root.get_submodule(n).register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str):
        def keep(_module, _args, output) -> None:
            self.outputs[name] = _output_tensor(output)
        return keep

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def compare_visit(transforms: list[Processor], quantizers: list[Processor],
                  targets_of: Callable[[str, nn.Module], list[str]], scores: dict[str, float],
                  per_module: Optional[dict[str, float]] = None) -> BlockVisit:
    """Score each block: the mean over its target modules (full names from `targets_of`) of the MSE between the
    outputs of the float reference and of the quantized copy. The reference is the block after the scheme's float
    transforms (`transforms`: smoothing, exact in float for the block's output but not for every linear's: v_proj
    and up_proj outputs are rescaled), the quantized copy is that reference after `quantizers`: each score is the
    error quantization adds to the scheme's own float linears. Attention scope passes `per_module` to get each
    module's MSE."""
    def visit(block_name: str, block: nn.Module, requests: list) -> list:
        targets = targets_of(block_name, block)
        reference = processed_copy(block_name, block, transforms, requests) if transforms else block
        processed = processed_copy(block_name, reference, quantizers, requests)
        relative = _relative(block_name, targets)
        errors = {n: MeanSquaredError() for n in relative}
        rerouted: set[str] = set()
        float_capture, quant_capture = _Capture(reference, relative), _Capture(processed, relative)
        outputs = []
        try:
            for request in requests:
                if reference is not block:
                    _forward(reference, request)
                outputs.append(_forward(block, request))  # the float block's output feeds the next block
                _forward(processed, request)
                for n in relative:
                    reference_out = float_capture.outputs.pop(n, None)
                    quantized_out = quant_capture.outputs.pop(n, None)
                    if reference_out is None or quantized_out is None:
                        continue  # a routed expert one of the two forwards did not call
                    if reference_out.shape != quantized_out.shape:  # the router sent it other tokens
                        rerouted.add(n)
                        continue
                    errors[n].add(reference_out, quantized_out)
        finally:
            float_capture.remove()
            quant_capture.remove()
        if rerouted:
            log.info("%s: %d routed expert linear(s) received other tokens once quantized (routing changed); "
                     "they are scored on the batches where both routings agree", block_name, len(rerouted))
        scores[block_name] = mean_of(list(errors.values()))
        if per_module is not None:
            for n, error in errors.items():
                if error.value is not None:
                    per_module[f"{block_name}.{n}"] = error.value
        del processed, reference
        return outputs
    return visit


class _HeadInputs:
    """The hidden states the output head receives, one per forward (a pre-hook on get_output_embeddings())."""

    def __init__(self, model: nn.Module) -> None:
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ProcessingError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is "
                                  f"None), so mse_model_wise cannot compare logits; use --metrics mse_layer_wise")
        self.latest: Optional[torch.Tensor] = None
        self.hook = self.head.register_forward_pre_hook(self._keep)

    def _keep(self, _module, args) -> None:
        self.latest = args[0].detach()

    def remove(self) -> None:
        self.hook.remove()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def model_wise_visit(model: nn.Module, batches: list[dict], processors: list[Processor],
                     scores: dict[str, float]) -> BlockVisit:
    """mse_model_wise: with block i alone replaced by its processed copy, the MSE of the final logits against the
    float model's, over every calibration batch. Needs the whole model resident and costs one full forward per
    block and batch (plus one float forward per batch)."""
    head = _HeadInputs(model)
    float_hidden = []
    try:
        for batch in batches:
            model(**batch, use_cache=False)
            float_hidden.append(head.latest)
    finally:
        head.remove()

    def visit(block_name: str, block: nn.Module, requests: list) -> list:
        processed = processed_copy(block_name, block, processors, requests)
        error = MeanSquaredError()
        capture = _HeadInputs(model)
        _replace(model, block_name, processed)
        try:
            for batch, reference in zip(batches, float_hidden):
                model(**batch, use_cache=False)
                quantized = capture.latest  # taken first: calling the head below fires the hook again
                error.add(capture.head(reference), capture.head(quantized))
        finally:
            _replace(model, block_name, block)
            capture.remove()
        scores[block_name] = error.value or 0.0
        return [_forward(block, r) for r in requests]
    return visit
