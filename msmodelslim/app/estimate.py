"""Dry-run estimates of the real run (`quant --dry_run`, issue #23 item 5): peak RSS, output size on disk (and
whether the save_path's disk has room) and wall time.

They come from measuring a small piece of the real run, not from a model of the machine:
- the outside-block weights (embeddings, head) are loaded and every calibration batch is embedded, as the real
  run does first; the peak and the resident memory of that are measured;
- the first decoder block is loaded and runs the pipeline's processors on the first few batches (its calibration
  forwards timed apart from the rest), then is written by each saver into a temporary directory: that gives the
  block's working memory, its load/process/write times and the bytes each layer takes in each format;
- the rest is extrapolated: forward time by calibration tokens, load time by the blocks' input bytes, output bytes
  per scheme by each layer's weight elements (shapes from the meta-device model, dtypes and sizes from the
  safetensors headers), the memory of the calibration activations by their measured size, the saving phase's
  memory by the tables read again and what the format checklist maps (docs/failure_behaviour.md).

Assumptions (also printed): every calibration batch is forwarded in every block (early stopping, spec.calibration,
can only shorten the run); a processor's memory beyond the activations does not grow with the number of samples;
the other blocks cost what the first one does, in proportion to their size; nothing else runs on the machine.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from msmodelslim.app.estimate_output import (block_output_bytes, checkpoint_bytes, dtype_bytes, file_bytes,
                                             measure_block_bytes, outside_bytes, side_file_bytes, writing_seconds)
from msmodelslim.app.estimate_prior import PriorCost, measure_prior
from msmodelslim.app.estimate_report import RunEstimate
from msmodelslim.app.estimate_sample import tensor_bytes, through_leading_blocks, timed_batches
from msmodelslim.core.config import RunnerType
from msmodelslim.core.logging import get_logger
from msmodelslim.core.memory import (bound_heap_growth, current_rss, peak_rss_since_reset, release_free_heap,
                                     reset_peak_rss, reuse_threshold_bytes)
from msmodelslim.core.resume import CheckpointSchedule
from msmodelslim.core.reference import ReferenceStream
from msmodelslim.core.runner import blocks_as_stored, process_block
from msmodelslim.format.disk_space import receiving_directory
from msmodelslim.format.shards import fsync_path
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.quantizer.primitives import all_finite

log = get_logger("app.estimate")



# ---- the measurement -----------------------------------------------------------------------------------------
class _ForwardClock:
    """Seconds and tokens of each call of a module's forward (the calibration forwards: what grows with the
    samples). The first call pays one-time costs (allocator, kernels' first use), so the rate leaves it out."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[float, int]] = []  # (seconds, tokens)
        self._started = 0.0
        self._handles = [module.register_forward_pre_hook(self._start),
                         module.register_forward_hook(self._stop, with_kwargs=True)]

    def _start(self, module, args) -> None:
        self._started = time.perf_counter()

    def _stop(self, module, args, kwargs, output) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        tokens = hidden.shape[:-1].numel() if isinstance(hidden, torch.Tensor) else 0
        self.calls.append((time.perf_counter() - self._started, tokens))

    @property
    def seconds(self) -> float:
        return sum(s for s, _ in self.calls)

    def seconds_per_token(self) -> float:
        steady = self.calls[1:] if len(self.calls) > 1 else self.calls
        return sum(s for s, _ in steady) / max(sum(t for _, t in steady), 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _LargestOutput:
    """The largest tensor a leaf module of a block returns during its forwards (an MLP's gate/up output, usually):
    the size of the temporaries that glibc's heap keeps between batches (`_fragmentation_bytes`)."""

    def __init__(self, module: nn.Module) -> None:
        self.bytes = 0
        self._handles = [m.register_forward_hook(self._seen) for m in module.modules() if not list(m.children())]

    def _seen(self, module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            self.bytes = max(self.bytes, output.numel() * output.element_size())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# The heap's growth beyond the measured batches is counted for at most this many: in the probes of
# docs/benchmarks.md ("Heap reuse inside a block"), a SmolLM2 layer's heap grew over its first four batches of
# 16 x 512 tokens, then stayed the same size over further passes.
FRAGMENTING_BATCHES = 4


def _fragmentation_bytes(largest_temporary: int, batches: int, timed: int) -> int:
    """What a block's peak gains over the dry run's measurement, which runs its first batches on a clean heap:
    inside a block glibc keeps freed temporaries up to the reuse cap (core/memory.py heap_reused), and the
    allocations that outlive a batch (its output) land in the holes the large temporaries leave, so each later
    batch can add about one of the largest temporaries to the heap (measured: 18-114 MiB per batch against 48 MiB
    gate/up outputs on SmolLM2). Temporaries above the cap get mappings of their own and leave no holes."""
    if largest_temporary > reuse_threshold_bytes():
        return 0
    return largest_temporary * min(max(batches - timed, 0), FRAGMENTING_BATCHES)


def _run_processors(name: str, block: nn.Module, processors: list, requests: list, calibration) -> list:
    """The runner's per-block schedule (core/runner.py process_block) on `requests`, without early stopping, in
    the calibration precision of the real run, with its forward of the quantized block when the next block
    calibrates on that (`calibration`: spec.calibration), and with GPTAQ's forwards of the float block."""
    reference = ReferenceStream.for_one_block(requests) if any(p.uses_reference for p in processors) else None
    return process_block(name, block, processors, requests, precision=calibration.reduced_precision(),
                         quantized_outputs=calibration.next_block_inputs == "quantized", reference=reference) or []


def _check_seconds(directory: Path) -> float:
    """Reading back and checking (finite values) what a writer put in `directory`: the format checklist's pass
    over every output tensor (format/integrity.py read_checked_tensors), timed on the block's shard."""
    clock = time.perf_counter()
    for shard in sorted(directory.glob(".shard-*")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                all_finite(f.get_tensor(key))
    return time.perf_counter() - clock


def _touched_fraction(directory: Path) -> float:
    """The share of a written block's bytes that the checklist's read-back brings into memory. The shards are
    memory-mapped, and only the values it checks for NaN/Inf are touched: floating-point tensors and deq_scale's
    int64-encoded floats; integer codes (most of a quantized block) are never paged in."""
    touched = total = 0
    for shard in sorted(directory.glob(".shard-*")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                size = tensor.numel() * tensor.element_size()
                total += size
                touched += size if tensor.is_floating_point() or key.endswith(".deq_scale") else 0
    return touched / total if total else 1.0


def _checkpoint_seconds_per_byte(outputs: list, directory: Path) -> float:
    """What a block checkpoint (core/resume.py) costs per byte of hidden states: saved and fsynced."""
    tensors = {f"batch{i}": block_hidden_state(o).detach().contiguous() for i, o in enumerate(outputs)}
    if not tensors:
        return 0.0
    path = directory / "inputs.safetensors"
    clock = time.perf_counter()
    save_file(tensors, path)
    fsync_path(path)
    seconds = time.perf_counter() - clock
    size = path.stat().st_size
    path.unlink()
    return seconds / max(size, 1)


def _assumptions(job, decoder: list[str], leading: list[str], checkpoints: int, schedule: CheckpointSchedule,
                 largest_temporary: int) -> list[str]:
    """What the extrapolation takes for granted, printed with the estimate."""
    assumptions = ["every calibration batch is forwarded in every block (early stopping, spec.calibration, can "
                   "only make the run shorter)",
                   "a processor's memory beyond the calibration activations does not grow with the number of samples",
                   f"the other {len(decoder) - 1} blocks cost what {decoder[0]} does, in proportion to their weights "
                   f"(loading, writing) and to the calibration tokens (forwards)"
                   + (f"; {', '.join(leading)} run once before it, on the same batches, and count as measured"
                      if leading else ""),
                   "this machine as it is now: the same threads (OMP_NUM_THREADS), no other heavy process, the "
                   "input files as cached now"]
    if job.runner == RunnerType.dp_layer_wise:
        assumptions.append("dp_layer_wise: estimated as one layer_wise process over all the batches (each rank "
                           "holds its share of the activations and forwards its share of the tokens)")
    calibration = job.config.spec.calibration
    precision = calibration.reduced_precision()
    if precision is not None:
        assumptions.append(f"spec.calibration.precision {precision.name}: the range-only calibration forwards are "
                           f"timed in {precision.name}, as the run computes them")
    if calibration.next_block_inputs == "quantized":
        assumptions.append("spec.calibration.next_block_inputs quantized: the forward of the quantized block that "
                           "feeds the next one is timed with the calibration forwards and counted for every block "
                           "(the last has none: a slight overestimate)")
    if any(p.uses_reference for p in job.processors):
        assumptions.append("GPTAQ (gptaq_alpha): the float block's forward beside each GPTQ step's is timed; the "
                           "float model's hidden states it carries (one more per batch) are not counted in memory")
    if job.prior:
        assumptions.append(f"spec.prior ({len(job.prior)} stage(s)): one forward per block on each stage's data, "
                           "timed on the last decoder block, and the learning measured on one chunk of rows; the "
                           "main stage timed with QuaRot's starting rotation in place of the learned one")
    if any(p.needs_calibration for p in job.processors):
        assumptions.append("the C heap: each batch after the measured ones leaves about one of the block's largest "
                           f"temporaries ({largest_temporary / 2**20:.1f} MiB) in it, for up to {FRAGMENTING_BATCHES} "
                           "batches, where it is below MSMODELSLIM_HEAP_REUSE_MIB; later blocks can peak higher "
                           "still (27 % on SmolLM2 with GPTQ W4A4, docs/benchmarks.md; MSMODELSLIM_HEAP_REUSE_MIB "
                           "trades time for a steadier peak)")
    if os.environ.get("MSMODELSLIM_ACTIVATION_MEMORY_MIB"):
        assumptions.append("the activations stay in memory (MSMODELSLIM_ACTIVATION_MEMORY_MIB spilling is not "
                           "modelled)")
    if checkpoints:
        assumptions.append(f"{checkpoints} resume checkpoints (every batch's activations, fsynced, at the measured "
                           f"rate, behind the next block: only what outlasts it is counted; the shards they fsync "
                           f"are counted in writing) ({schedule.describe()})")
    return assumptions


def estimate_run(job, request, startup_s: float, writer_factories: dict[str, Callable[[Path], object]],
                 tied_aliases: dict[str, bool], scratch: Path) -> RunEstimate:
    """Measure the first block of the real run and extrapolate (module docstring). `job`: the dry run's planned
    job (app/quantize.py) with the meta-device model; `startup_s`: how long the command took to get here (imports,
    checks, planning: the real run spends it too); `writer_factories`: per saver type, a writer into a given directory;
    `scratch`: an empty directory on the save_path's disk for the throwaway writes (the caller removes it)."""
    begun = time.perf_counter()
    adapter, processors, plan = job.adapter, job.processors, job.plan
    device = request.device.primary
    block_names = adapter.block_names(job.model)
    blocks = len(block_names)
    # The measured block stands for the decoder layers; blocks before the first of them (a vision-language
    # model's vision tower) are run once first, as the real run does, and count as they are.
    structure = getattr(adapter, "structure", None)
    decoder = [b for b in block_names if structure is None or structure.is_decoder_layer(b)] or block_names
    leading = block_names[:block_names.index(decoder[0])]
    layer_wise = job.runner != RunnerType.model_wise
    schedule = CheckpointSchedule.from_env()
    checkpointing = schedule.enabled and job.fingerprint is not None
    calibration = job.config.spec.calibration

    # 1. what the real run does first: the outside weights, the processors' model-wide preparation, the batches
    load_peak_known = reset_peak_rss()  # reading the checkpoint briefly holds its stored copy and the widened one
    clock = time.perf_counter()
    # as the real run loads: layer_wise leaves an untied output head unread until it is written
    model = adapter.load_weights(job.model, device, load_layers=False, defer_output_head=layer_wise)
    load_outside_s = time.perf_counter() - clock
    deferred = [n for n, t in model.state_dict().items() if t.is_meta and not any(n.startswith(b + ".")
                                                                                  for b in block_names)]
    bound_heap_growth()  # where the real run fixes the allocator (core/memory.py): the memory measured is that run's
    meta = adapter.init_skeleton()  # an untouched meta-device copy: every block's shapes
    needs_data = any(p.needs_calibration for p in processors)
    clock = time.perf_counter()
    for processor in processors:
        processor.prepare_model(model)
    batches = adapter.handle_dataset(job.calibration, device) if needs_data else []
    forwards, requests = [], []
    for batch in batches:
        forwards.append(adapter.generate_model_forward(model, batch))
        requests.append(next(forwards[-1]))
    embed_s = time.perf_counter() - clock
    rss_embedded = current_rss()
    # spec.prior: timed on the last decoder block, so that the first one's load below is still a cold one
    prior = measure_prior(job, model, decoder[-1], device, len(decoder), leading) if job.prior else PriorCost()
    load_peak = (peak_rss_since_reset() if load_peak_known else None) or rss_embedded
    total_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    hidden_bytes = sum(tensor_bytes(r.args[0], set()) for r in requests)  # one copy of every batch's activations
    released = (layer_wise and not any(getattr(p, "changes_outside_blocks", False) for p in processors)
                and hasattr(adapter, "release_outside") and adapter.release_outside(model, block_names))
    release_free_heap()
    rss_blocks = current_rss()
    head_read_s = 0.0
    if deferred and released:  # the real run reads the deferred head when it writes it: time that read
        clock = time.perf_counter()
        adapter.load_outside(model, deferred, as_stored=True)  # as write_outside_blocks reads it
        head_read_s = time.perf_counter() - clock
        adapter.release_outside(model, block_names)
        release_free_heap()

    # 2. the first decoder block, on the first batches: its memory beyond what is resident, its load and processing
    # times (after the leading blocks, loaded, processed and released once on those batches)
    name = decoder[0]
    timed = timed_batches(batches) if batches else 0
    timed_tokens = sum(int(b["input_ids"].numel()) for b in batches[:timed])
    clock = time.perf_counter()
    as_stored = layer_wise and blocks_as_stored(processors)  # as the real run loads the blocks
    requests = through_leading_blocks(adapter, model, leading, device, forwards, requests,
                                      lambda n, b, r: _run_processors(n, b, processors, r[:timed], calibration),
                                      as_stored)
    leading_s = (time.perf_counter() - clock) * (len(batches) / timed if timed else 1)  # forwards: every batch
    if leading and timed:  # the decoder blocks' activations, from the batches advanced (scaled by tokens)
        hidden_bytes = sum(tensor_bytes(r.args[0], set()) for r in requests[:timed]) * total_tokens // max(
            timed_tokens, 1)
    peak_known = reset_peak_rss()
    before = current_rss()
    clock = time.perf_counter()
    adapter.load_block(model, name, device, as_stored=as_stored)
    load_block_s = time.perf_counter() - clock
    block = model.get_submodule(name)
    forward_clock, largest = _ForwardClock(block), _LargestOutput(block)
    clock = time.perf_counter()
    outputs = _run_processors(name, block, processors, requests[:timed], calibration)
    process_s = time.perf_counter() - clock
    forward_clock.remove()
    largest.remove()
    peak = peak_rss_since_reset() if peak_known else None
    block_extra = max((peak if peak is not None else current_rss()) - before, 0)
    timed_output_bytes = sum(tensor_bytes(block_hidden_state(o), set()) for o in outputs)
    checkpoint_rate = _checkpoint_seconds_per_byte(outputs, scratch) if checkpointing else 0.0
    for generator in forwards:
        generator.close()
    del outputs, requests, forwards

    # 3. each format's bytes for the block (the layers one by one), and its writing rate
    block_input_bytes = [checkpoint_bytes(adapter, [f"{b}.{n}" for n in meta.get_submodule(b).state_dict()])
                         for b in block_names]
    stored_bytes = dtype_bytes(adapter.global_dtype())
    output_bytes, write_s, disk_s, sync_s, check_s, finish_peak = {}, 0.0, 0.0, 0.0, 0.0, 0
    for saver, factory in writer_factories.items():
        directory = scratch / saver
        directory.mkdir()
        writer = factory(directory)
        clock = time.perf_counter()
        measured = measure_block_bytes(writer, name, block, meta.get_submodule(name), plan)
        block_write_s = time.perf_counter() - clock
        clock = time.perf_counter()
        writer.shards.sync()  # what each block checkpoint does to the shards written since the last one
        block_sync_s = time.perf_counter() - clock
        sync_s += block_sync_s
        check_rate = _check_seconds(directory) / max(measured.total, 1)  # per output byte
        block_touched = _touched_fraction(directory)
        blocks_out = sum(block_output_bytes(b, meta, plan, measured, stored_bytes) for b in block_names)
        outside = (outside_bytes(meta, block_names, adapter, tied_aliases[saver])
                   + checkpoint_bytes(adapter, job.unread.passthrough_names))
        outside_tensors = len(meta.state_dict()) - len(meta.get_submodule(name).state_dict()) * blocks
        tensors = measured.tensors * blocks + outside_tensors
        output_bytes[saver] = (file_bytes(blocks_out + outside, tensors, measured)
                               + side_file_bytes(request.model_path))
        write_s += block_write_s / max(measured.total, 1) * output_bytes[saver]  # the outside tensors at that rate
        disk_s += (block_write_s + block_sync_s) / max(measured.total, 1) * output_bytes[saver]  # written and fsynced
        check_s += check_rate * output_bytes[saver]
        # the checklist reads the written shards back through a memory map, touching only what it checks (the
        # non-block tables are all float): ascendv1's keeps every tensor until it is done, compressed-tensors' one
        # file at a time
        data = blocks_out * block_touched + outside
        held = data if tied_aliases[saver] else min(data, measured.shard_limit or data)
        finish_peak = max(finish_peak, held)
        shutil.rmtree(directory, ignore_errors=True)
    adapter.release_block(model, name)
    first = block_names.index(name)
    # the first load also pays one-time costs (opening the shards): a second block says what a load is
    if first + 1 < blocks:
        clock = time.perf_counter()
        adapter.load_block(model, block_names[first + 1], device, as_stored=as_stored)
        load_block_s = min(load_block_s, (time.perf_counter() - clock) * block_input_bytes[first]
                           / max(block_input_bytes[first + 1], 1))
        adapter.release_block(model, block_names[first + 1])

    # 4. extrapolate
    # forwards per block, e.g. 2: smoothing's, then the static ranges'
    forwards_per_block = sum(t for _, t in forward_clock.calls) / max(timed_tokens, 1)
    # the decoder blocks' load/write cost relative to the measured one
    by_weights = sum(block_input_bytes[first:]) / max(block_input_bytes[first], 1)
    phases = {
        "start-up and planning": startup_s,
        # released outside tensors are read again to be written
        "loading": load_outside_s * (2 if released else 1) + head_read_s + load_block_s * by_weights,
        "embedding": embed_s,
        "calibration forwards": (forward_clock.seconds_per_token() * total_tokens * forwards_per_block
                                 * (blocks - len(leading))),
        "processing": max(process_s - forward_clock.seconds, 0.0) * by_weights + leading_s,
        "writing": writing_seconds(write_s, disk_s, sum(output_bytes.values()), checkpointing),
        "checking": check_s,
    }
    if job.prior:
        phases["spec.prior stages"] = prior.seconds
    # the checkpoints: as many as the schedule gives for blocks of the estimated length
    block_s = sum(phases[p] for p in ("loading", "calibration forwards", "processing", "writing")) / max(blocks, 1)
    # each is written behind the next block (core/resume.py): the run waits only for what outlasts that block
    checkpoint_s = sync_s + checkpoint_rate * hidden_bytes
    stall_s = max(checkpoint_s - block_s, 0.0)
    checkpoints = schedule.count(blocks, block_s, stall_s) if checkpointing else 0
    # the blocks' shards reach the disk once, counted in "writing"
    phases["writing"] += stall_s * checkpoints
    assumptions = _assumptions(job, decoder, leading, checkpoints, schedule, largest.bytes)
    resident = rss_blocks
    if not layer_wise:  # model_wise: every block resident, widened to float32 as loaded
        resident += 4 * sum(t.numel() for b in block_names[1:] for t in meta.get_submodule(b).state_dict().values())
    # in a block: every batch's input and output activations, the block, its processors' temporaries, and the holes
    # the later batches leave in the heap
    in_block = (resident + hidden_bytes + max(block_extra - timed_output_bytes, 0)
                + _fragmentation_bytes(largest.bytes, len(batches), timed))
    # saving: the activations are gone; the non-block tables are written one at a time in the checkpoint's dtype
    # (read back as stored when released, converted from float32 otherwise), one of them possibly still queued for
    # the shard writer while the next is read; then the checklist maps the output
    largest_outside = max((t.numel() for n, t in meta.state_dict().items()
                           if not any(n.startswith(b + ".") for b in block_names)), default=0)
    after_blocks = max(resident - hidden_bytes, 0)
    saving = after_blocks + max(2 * largest_outside * stored_bytes, finish_peak)
    peak_rss = max(load_peak, in_block, saving, rss_embedded + prior.memory_bytes)
    receiving = receiving_directory(request.save_path)
    estimate = RunEstimate(int(peak_rss), output_bytes, shutil.disk_usage(receiving).free, receiving,
                           sum(phases.values()), phases, name, timed, len(batches), blocks, assumptions)
    estimate.measured_in_seconds = time.perf_counter() - begun
    log.debug("estimate: load peak %d, rss embedded %d, resident in blocks %d, activations %d, block extra %d "
              "(peak known: %s); block 0: load %.3f s, processing %.3f s of which forwards %.3f s on %d of %d tokens "
              "(forward calls (s, tokens): %s)",
              load_peak, rss_embedded, resident, hidden_bytes, block_extra, peak_known, load_block_s, process_s,
              forward_clock.seconds, timed_tokens, total_tokens, [(round(s, 4), t) for s, t in forward_clock.calls])
    return estimate
