"""Runners: walk the decoder blocks in order, run the processors on each, hand each finished block to the
writer.

layer_wise: only the current block's weights are materialised (read from the safetensors shards, processed,
written, dropped back to the meta device). model_wise: the whole model is loaded first and stays resident.
Both execute the same per-block schedule, so the same config and data give byte-identical output.
dp_layer_wise is layer_wise on each of several ranks (core/distributed.py): each rank forwards its own share of
the batches, the processors merge their statistics across ranks after each forward (`synchronize`), and only
rank 0 (the one given a writer) writes. After the blocks and the embeddings/head, the checkpoint tensors the
model does not read (e.g. a multi-token-prediction layer) are written through (core/passthrough.py).

Calibration: every batch's generator (`adapter.generate_model_forward`) yields the current block's inputs.
Each processor that needs data gets its own forward of the block, after the processors before it changed the
block (so statistics are taken on the block as it will be quantized), unless the per-channel input ranges of
an earlier forward, carried through the exact per-channel scalings applied since, give it everything that
forward would (core/calibration.py: smoothing then static min/max ranges costs one forward, not two). The
last forward's output, taken before that processor quantizes, becomes the next block's input: with the second
forward saved, that is the output of the block before smoothing, equal in float to the smoothed one's up to
rounding. With `spec.calibration.next_block_inputs: quantized` one more forward of the quantized block gives the
next block's inputs instead (GPTQ's sequential order). A forward whose statistics are running extremes may stop
early once they converge (`spec.calibration`); the next blocks then get the batches it forwarded. With
`spec.calibration.precision: bfloat16` those same forwards run under bfloat16 autocast, their outputs cast back to
the block's dtype. Pipelines that need no data run no forward. A processor that fits the quantized model to the
float one (GPTAQ) gets the float model's activations beside the quantized ones (core/reference.py).

Blocks before the first decoder layer (a vision-language model's vision tower, model/vlm.py) are processed like
the others; they forward every batch (no early stop), and spilling is decided on the first decoder layer's inputs.

Resume (core/resume.py): given `checkpoints`, the state after a finished block is recorded when their schedule
says so; given `resume`, the run skips the blocks a killed run checkpointed, feeding the next block the hidden
states that run saved.
"""
from __future__ import annotations

import copy
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from msmodelslim.core.activations import ActivationSpill
from msmodelslim.core.calibration import BlockInputRanges, Convergence, EarlyStop, ReducedPrecision
from msmodelslim.core.device import cpu_has_native_bfloat16
from msmodelslim.core.distributed import LOCAL, Collective
from msmodelslim.core.faults import fault_point
from msmodelslim.core.logging import get_logger, progress_disabled
from msmodelslim.core.memory import heap_reused, release_free_heap
from msmodelslim.core.outside_blocks import is_under, outside_entries, write_outside_blocks
from msmodelslim.core.passthrough import write_passthrough
from msmodelslim.core.reference import Pairing, ReferenceStream
from msmodelslim.core.resume import BlockCheckpoints, ResumePoint
from msmodelslim.core.walk import BatchWalks
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.ir.quant_linear import decoded_weights_kept
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.model.passthrough import UnreadTensors
from msmodelslim.processor.base import Processor

log = get_logger("runner")


@dataclass
class RunStats:
    blocks: int
    calibration_batches: int
    calibration_tokens: int
    last_block_batches: Optional[int] = None  # batches the last block was calibrated on (fewer: early stop)
    processed_blocks: Optional[int] = None  # blocks this process computed (fewer than `blocks` when resumed)


def blocks_as_stored(processors: list[Processor]) -> bool:
    """Whether the blocks may be loaded in the checkpoint's bf16/fp16 (no float32 copy): only when no processor
    runs a calibration forward or computes with the weights beyond quantizing them (`takes_stored_weights`).
    On a 7B checkpoint that copy was half of a data-free run's time (docs/benchmarks.md)."""
    return bool(processors) and all(p.takes_stored_weights and not p.needs_calibration for p in processors)


def _block_dtype(block: nn.Module) -> Optional[torch.dtype]:
    """The dtype the block computes in without autocast: that of its first floating-point parameter."""
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), None)


def _restore_dtype(output: Any, autocast_dtype: torch.dtype, dtype: torch.dtype) -> Any:
    """`output` with every tensor autocast left in `autocast_dtype` cast back to `dtype` (tuples, lists and
    mappings walked): what the next block receives is then what a run without autocast hands it."""
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.dtype == autocast_dtype else output
    if isinstance(output, dict):  # a block's own fresh output (e.g. a ModelOutput): replaced in place
        for key, value in output.items():
            output[key] = _restore_dtype(value, autocast_dtype, dtype)
        return output
    if isinstance(output, (tuple, list)):
        restored = [_restore_dtype(o, autocast_dtype, dtype) for o in output]
        return output._make(restored) if hasattr(output, "_make") else type(output)(restored)
    return output


def _autocast(block: nn.Module, block_dtype: Optional[torch.dtype], requests: list, index: int, processor: Processor,
              precision: Optional[ReducedPrecision]) -> tuple[AbstractContextManager, Optional[torch.dtype]]:
    """The context `processor`'s calibration forward runs in, and the dtype autocast computes in (None: no
    autocast). Reduced precision applies only to a forward whose statistics are all running extremes of linear
    inputs: autocast would turn every matmul in the forward to the lower dtype, including those that other
    statistics' hooks compute (GPTQ's X^T X); a min/max is exact in any dtype. Declining is said once per step."""
    if precision is None or precision.dtype == block_dtype:
        return nullcontext(), None
    device = next((p.device for p in block.parameters()), None) or requests[0].args[0].device
    if not processor.range_statistics:
        reason = ("its calibration statistics are not only running extremes of linear inputs (e.g. GPTQ Hessians, "
                  f"histograms, AWQ means, row samples), and autocast would compute their matmuls in {precision.name} "
                  "too")
    elif not torch.amp.is_autocast_available(device.type):
        reason = f"torch has no autocast for device type {device.type}"
    else:
        if (-1, "emulated") not in precision.declined and device.type == "cpu" and \
                precision.dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
            precision.declined.add((-1, "emulated"))
            log.warning("spec.calibration.precision bfloat16: this CPU has no bfloat16 matmul units (AVX512-BF16, AMX "
                        "or Arm BF16), so torch emulates them and these calibration forwards run slower than in "
                        "float32 (about 4x measured); leave precision out (float32) for speed on this machine")
        return torch.autocast(device_type=device.type, dtype=precision.dtype), precision.dtype
    if (index, reason) not in precision.declined:
        precision.declined.add((index, reason))
        kind = getattr(getattr(processor, "config", None), "type", type(processor).__name__)
        dtype = str(block_dtype or torch.float32).removeprefix("torch.")
        log.log(logging.DEBUG if precision.chosen else logging.INFO,
                "spec.calibration.precision %s does not apply to spec.process[%d] (%s): %s; its calibration "
                "forwards run in %s", precision.name, index, kind, reason, dtype)
    return nullcontext(), None


@torch.no_grad()
def _forward_all(block_name: str, requests: list, spill: Optional[ActivationSpill],
                 convergence: Optional[Convergence] = None, block_dtype: Optional[torch.dtype] = None,
                 autocast_dtype: Optional[torch.dtype] = None, pairing: Optional[Pairing] = None) -> list:
    """The block's outputs for the requests forwarded: all of them, or the first ones until `convergence`
    says the statistics have settled. Run under autocast (`autocast_dtype`), the outputs are cast back to
    `block_dtype`. `pairing`: the float block's forward of the same batch, just before each."""
    outputs = []
    for index, request in enumerate(requests):
        assert request.name == block_name, f"forward generator out of step at {block_name}"
        if pairing is not None:
            pairing(index, request)
        output = request.module(*request.args, **request.kwargs)
        if autocast_dtype is not None and block_dtype is not None:
            output = _restore_dtype(output, autocast_dtype, block_dtype)
        if spill is not None:  # one batch's activations in memory at a time
            spill.evict(request.args[0])
            spill.move_to_disk(block_hidden_state(output))
        outputs.append(output)
        fault_point("calibration")
        if (convergence is not None and convergence.after_batch(request.args[0].shape[:-1].numel())
                and len(outputs) < len(requests)):
            break
    return outputs


def _calibration_forward(block_name: str, block: nn.Module, processor: Processor, requests: list,
                         spill: Optional[ActivationSpill], early_stop: Optional[EarlyStop], collective: Collective,
                         keep_ranges: bool, index: int = 0, precision: Optional[ReducedPrecision] = None,
                         pairing: Optional[Pairing] = None) -> tuple[list, Optional[BlockInputRanges]]:
    """One forward of the block for `processor` (spec.process[`index`]; its hooks are attached): the outputs,
    and (when `keep_ranges`: a later step calibrates) the per-channel ranges of every linear input, merged over
    ranks. `precision`: spec.calibration.precision when not float32 (see `_autocast`)."""
    watch = early_stop is not None and processor.range_statistics
    ranges = BlockInputRanges.record(block) if keep_ranges or watch else None
    convergence = Convergence(early_stop, ranges) if watch else None
    block_dtype = _block_dtype(block)
    autocast, autocast_dtype = _autocast(block, block_dtype, requests, index, processor, precision)
    try:
        with autocast:
            outputs = _forward_all(block_name, requests, spill, convergence, block_dtype, autocast_dtype, pairing)
    finally:
        if ranges is not None:
            ranges.stop()
    if convergence is not None and len(outputs) < len(requests):
        log.info("%s: calibration stopped after %d of %d batches (%d tokens): input ranges moved at most %.3g "
                 "(relative) over the last %d tokens", block_name, len(outputs), len(requests), convergence.tokens,
                 convergence.last_change, early_stop.window_tokens)
    elif convergence is not None and math.isfinite(convergence.last_change):
        log.info("%s: calibration used all %d batches available (ranges moved %.3g over the last %d tokens)",
                 block_name, len(outputs), convergence.last_change, early_stop.window_tokens)
    elif convergence is not None:  # fewer tokens than one window: no change was ever measured
        log.info("%s: calibration used all %d batches available (%d tokens, fewer than the %d-token window that "
                 "early stopping compares)", block_name, len(outputs), convergence.tokens, early_stop.window_tokens)
    if not keep_ranges:
        ranges = None
    if collective.distributed:
        if ranges is not None:
            ranges.merge(collective)
        processor.synchronize(block_name, block, collective)
    return outputs, ranges


def process_block(name: str, block: nn.Module, processors: list[Processor], requests: list,
                  spill: Optional[ActivationSpill] = None, early_stop: Optional[EarlyStop] = None,
                  collective: Collective = LOCAL, precision: Optional[ReducedPrecision] = None,
                  quantized_outputs: bool = False, reference: Optional[ReferenceStream] = None) -> Optional[list]:
    """Every processor on one block, in config order: its hooks, its calibration forward over `requests` (or the
    per-channel ranges an earlier forward left, when they suffice), its rewrite of the block. Returns the last
    forward's outputs (None when no processor calibrates), or with `quantized_outputs` those of one more forward
    of the quantized block over the same batches. `precision`: spec.calibration.precision when not float32
    (range-only forwards under autocast). `reference`: the float model's hidden states (core/reference.py),
    moved on to the next block's. The forwards' temporaries are reused from the heap, not mapped afresh for
    every batch (core/memory.py heap_reused)."""
    with heap_reused():
        return _process_block(name, block, processors, requests, spill, early_stop, collective, precision,
                              quantized_outputs, reference)


def _process_block(name: str, block: nn.Module, processors: list[Processor], requests: list,
                   spill: Optional[ActivationSpill], early_stop: Optional[EarlyStop], collective: Collective,
                   precision: Optional[ReducedPrecision], quantized_outputs: bool,
                   reference: Optional[ReferenceStream]) -> Optional[list]:
    outputs, ranges = None, None  # ranges: the block's linear inputs as the processors so far left them
    pairs = [reference is not None and p.needs_calibration and p.needs_reference(name, block) for p in processors]
    float_block, reference_outputs = None, None
    if reference is not None and not any(pairs):
        reference_outputs = reference.forward_all()
    for i, processor in enumerate(processors):
        if processor.needs_calibration and ranges is not None and processor.ranges_suffice(name, block, ranges):
            processor.calibrate_from_ranges(name, block, ranges)
        else:
            if pairs[i] and float_block is None:  # the block as the earlier steps left it, before any is quantized
                float_block = copy.deepcopy(block)
            processor.before_forward(name, block)
            if processor.needs_calibration:
                later = any(p.needs_calibration for p in processors[i + 1 :])
                pairing = Pairing(reference, float_block, processor, name) if pairs[i] else None
                outputs, ranges = _calibration_forward(name, block, processor, requests, spill, early_stop,
                                                       collective, keep_ranges=later, index=i, precision=precision,
                                                       pairing=pairing)
                if pairing is not None and reference_outputs is None:
                    reference_outputs = pairing.outputs
        processor.after_forward(name, block)
        if ranges is not None:
            ranges = ranges.scaled(processor.input_scaling(name, block))
    if outputs is not None and quantized_outputs:
        forwarded = requests[: len(outputs)]  # all, or those an early stop kept
        outputs = None  # the float outputs go before the quantized ones are computed
        with decoded_weights_kept(block):  # each weight decoded once for all batches
            outputs = _forward_all(name, forwarded, spill)
    if reference is not None:
        reference.advance(reference_outputs)
    return outputs


def run_blocks(
    adapter,
    model: nn.Module,
    processors: list[Processor],
    writer: Optional[AscendV1Writer],
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    layer_wise: bool,
    collective: Collective = LOCAL,
    spill: Optional[ActivationSpill] = None,
    unread: Optional[UnreadTensors] = None,
    early_stop: Optional[EarlyStop] = None,
    checkpoints: Optional[BlockCheckpoints] = None,
    resume: Optional[ResumePoint] = None,
    precision: Optional[ReducedPrecision] = None,
    quantized_inputs: bool = False,
    label: str = "quantize blocks",
) -> RunStats:
    """Quantize every block; `batches` are this rank's share, `writer` is None on ranks that do not write.
    `spill`, when given, moves the activations between blocks to disk if they exceed its budget. `unread`: the
    checkpoint tensors the model does not read; its pass-through groups are written after everything else.
    `early_stop`: the convergence rule that may end a calibration forward early (None: every batch).
    `checkpoints`: records finished blocks for --resume (on their schedule); `resume`: a killed run's last
    checkpoint, continued.
    `precision`: spec.calibration.precision when not float32 (range-only calibration forwards under autocast).
    `quantized_inputs`: the next block calibrates on this block's quantized outputs (spec.calibration
    next_block_inputs), not on its float ones. `label`: the progress bar's."""
    needs_data = any(p.needs_calibration for p in processors)
    as_stored = blocks_as_stored(processors)
    reference = None  # the float model's hidden states, when a processor fits to them (core/reference.py)
    block_names = adapter.block_names(model)
    if any(p.changes_outside_blocks for p in processors):  # e.g. a head left unread at load: rotations change it
        deferred = [n for n, p in model.named_parameters() if p.is_meta and not is_under(n, block_names)]
        if deferred:
            adapter.load_outside(model, deferred)
    for processor in processors:
        processor.prepare_model(model)
    walks = BatchWalks()
    if needs_data:
        if any(p.uses_reference for p in processors):
            reference = ReferenceStream()
        for batch in tqdm(batches, desc="embed calibration batches", unit="batch", disable=progress_disabled()):
            walks.start(adapter.generate_model_forward(model, batch))
            if reference is not None:  # the float model's own walk through the blocks
                reference.start(adapter.generate_model_forward(model, batch))
        if resume is not None:
            inputs, reference_inputs = resume.load_hidden_states(device, with_reference=reference is not None)
            walks.fast_forward(resume.live_batches, resume.next_block, inputs)
            if reference is not None:
                reference.fast_forward(resume.live_batches, resume.next_block, reference_inputs)
    # Spilling is decided on the first decoder layer's inputs: blocks before it (a vision-language model's vision
    # tower) take other inputs (pixel values), and their outputs are not hidden states.
    pending_spill, spill = (spill if needs_data else None), None
    structure = getattr(adapter, "structure", None)
    # The blocks need the embeddings and the head no more (the batches are embedded): on large vocabularies their
    # float32 tables would double what one block needs, so they go until they are written, unless a processor
    # changed them (rotations), since then the checkpoint no longer holds them.
    outside = outside_entries(model, block_names)
    released = layer_wise and not any(p.changes_outside_blocks for p in processors) and \
        adapter.release_outside(model, block_names)
    start = 0
    if resume is not None:
        start = resume.next_block  # the writer was restored to that point (app/quantize.py)
        log.info("resumed: blocks %s to %s were finished by the interrupted run; continuing with block %d of %d",
                 block_names[0], block_names[start - 1], start, len(block_names))
    bar = tqdm(adapter.generate_model_visit(model), total=len(block_names), desc=label, unit="block",
               disable=progress_disabled())
    for index, visit in enumerate(bar):
        name = visit.name
        if index < start:
            continue
        if layer_wise:
            adapter.load_block(model, name, device, as_stored=as_stored)
            if index + 1 < len(block_names):
                adapter.prefetch_block(model, block_names[index + 1])
            elif released:  # the tables are read back next, to be written (a cold 7B head: 0.4 GB from disk)
                adapter.prefetch_outside(model, sorted({source for _, source in outside}))
        block = model.get_submodule(name)
        if pending_spill is not None and (structure is None or structure.is_decoder_layer(name)):
            if pending_spill.engage(walks.hidden_states()):
                if checkpoints is not None:
                    checkpoints.wait()  # spilling swaps the storage of the hidden states it may be reading
                spill = pending_spill
                walks.move_to_disk(spill)
                if reference is not None:
                    reference.move_to_disk(spill)
            pending_spill = None
        leading = structure is not None and not structure.is_decoder_layer(name)
        # a leading block (vision tower) forwards every batch: stopping early there would drop images for every
        # text layer after it
        outputs = process_block(name, block, processors, walks.requests, spill, None if leading else early_stop, collective,
                                precision, quantized_outputs=quantized_inputs and index + 1 < len(block_names),
                                reference=reference)
        if outputs is not None and len(outputs) < len(walks.requests):  # stopped early: later blocks get these
            walks.keep(len(outputs))
            if reference is not None:
                reference.keep(len(outputs))
        if outputs is not None:  # the last forward's outputs feed the next block
            if checkpoints is not None:
                checkpoints.wait()  # the checkpoint behind this block holds its inputs, which advancing frees
            walks.advance(outputs)
        if writer is not None:
            writer.add_module_tree(name, block)
            fault_point(f"block:{index}")
            if checkpoints is not None and checkpoints.due(index):
                checkpoints.save(index, walks.hidden_states(), len(walks.requests), writer,
                                 reference.hidden_states() if reference is not None else None)
        if layer_wise:
            adapter.release_block(model, name)
        release_free_heap()
    if checkpoints is not None:
        checkpoints.wait()  # the last block's: recorded before the shards are finished and named
    if writer is not None:
        write_outside_blocks(model, block_names, outside, writer, adapter, released)
        write_passthrough(adapter, unread or UnreadTensors(), processors, writer)
    processed = len(block_names) - start
    if not needs_data:
        return RunStats(len(block_names), 0, 0, processed_blocks=processed)
    tokens = collective.sum_int(sum(int(b["input_ids"].numel()) for b in batches))
    return RunStats(len(block_names), collective.sum_int(len(batches)), tokens,
                    collective.sum_int(len(walks.requests)), processed)
