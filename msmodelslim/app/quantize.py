"""Use case: quantize a checkpoint into an ascendv1 directory.

Everything that can be checked cheaply is checked before any weight is read: paths, device, config, model
type, dataset, the layer plan (which rule matches which linear, group sizes). The output is written into a
staging directory and moved into place only after it passed the format checklist. After finished blocks (by
default once the blocks since the last checkpoint took 20x its cost, and after the last) a checkpoint is recorded
there (core/resume.py), so that a killed run continues with `--resume`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.app.estimate import estimate_run
from msmodelslim.app.estimate_report import RunEstimate
from msmodelslim.app.plan import plan_layers, summarize_plan
from msmodelslim.app.quantize_checks import (refuse_duplicate_savers, refuse_mismatched_modality,
                                             refuse_schemes_the_format_lacks, refuse_split_fused_groups,
                                             refuse_smoothing_after_online_rotation, refuse_steps_around_flatquant,
                                             refuse_steps_the_format_lacks, refuse_undistributable,
                                             writer_class_of)
from msmodelslim.app.quantize_output import finish_outputs, make_writer, make_writers, subfolders
from msmodelslim.app.quantize_prior import PriorRun, prior_runs, run_prior
from msmodelslim.app.quantize_request import (QuantizeReport, QuantizeRequest, load_practice, peak_rss_mib,
                                            require_model_dir, with_model_type)
from msmodelslim.app.quantize_resume import resume_point
from msmodelslim.core.activations import ActivationSpill
from msmodelslim.core.config import CalibrationConfig, PracticeConfig, RunnerType
from msmodelslim.core.dataset import load_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.distributed import LOCAL, Collective, contiguous_share, spawn_ranks, torchrun_group, torchrun_world
from msmodelslim.core.faults import fault_point
from msmodelslim.core.logging import get_logger, level_from_env, setup_logging
from msmodelslim.core.memory import bound_heap_growth, reuse_threshold_bytes
from msmodelslim.core.passthrough import log_unread, refuse_inconsistent_passthrough
from msmodelslim.core.resume import BlockCheckpoints, Fingerprint, ResumePoint
from msmodelslim.core.runner import RunStats, run_blocks
from msmodelslim.core.vlm_dataset import MEDIA, CalibrationData, load_vlm_samples
from msmodelslim.format.ascendv1.tensors import split_flat_tag
from msmodelslim.format.disk_space import check_free_space, estimate_output_bytes, receiving_directory
from msmodelslim.format.integrity import required_tensors
from msmodelslim.format.fan_out import SUBFOLDERS, FanOutWriter
from msmodelslim.format.staging import RESUME_STATE, check_save_path, discard_resumable, staged_directory
from msmodelslim.model.passthrough import UnreadTensors
from msmodelslim.model.registry import create_adapter, resolve
from msmodelslim.processor.base import PriorResults, Processor, ProcessorContext, build_pipeline

log = get_logger("app.quantize")


def data_parallel_world(device: DeviceSpec) -> int:
    """How many dp_layer_wise ranks the request gives: WORLD_SIZE under torchrun, else the listed devices."""
    return torchrun_world() if torchrun_world() > 1 else max(1, len(device.indices))


def choose_runner(config: PracticeConfig, device: DeviceSpec) -> RunnerType:
    runner = config.spec.runner
    world = data_parallel_world(device)
    if runner == RunnerType.auto:
        runner = RunnerType.dp_layer_wise if world > 1 else RunnerType.layer_wise
    if runner == RunnerType.dp_layer_wise and world == 1:
        log.warning("spec.runner dp_layer_wise needs several devices (e.g. --device npu:0,1 or cpu:0,1, or torchrun); "
                    "running layer_wise on %s", device)
        runner = RunnerType.layer_wise
    return runner


@dataclass
class _Job:
    """Everything checked and built before the first weight of a block is read."""

    config: PracticeConfig
    runner: RunnerType
    adapter: object
    processors: list[Processor]
    calibration: CalibrationData  # texts, or a VLM run's image samples (what adapter.handle_dataset takes)
    model: nn.Module
    plan: dict[str, str]
    spill: Optional[ActivationSpill]  # None for a dry run
    required: dict[str, list[tuple[str, ...]]]  # per saver type: tensor names its output must hold (alternatives)
    unread: UnreadTensors  # the checkpoint's tensors the model does not read: written through, or consumed
    source_tensors: list[str]  # every tensor of the input checkpoint (the output must account for each)
    fingerprint: Optional[Fingerprint] = None  # what the block checkpoints are tied to (None: dp_layer_wise)
    resume_from: Optional[ResumePoint] = None  # --resume: the killed run's last checkpoint (writer state unread yet)
    prior: list[PriorRun] = field(default_factory=list)  # spec.prior, run before the main walk
    prior_results: PriorResults = field(default_factory=PriorResults)  # what they hand to the main stage


def _launches_ranks(runner: RunnerType) -> bool:
    """dp_layer_wise outside torchrun: this process plans, then spawns one rank per device and waits."""
    return runner == RunnerType.dp_layer_wise and torchrun_world() <= 1


@dataclass
class _Written:
    """What the rank that wrote the checkpoint hands back."""

    description: dict
    warnings: list[str]
    stats: RunStats
    peak_rss_mib: float


def load_calibration(config: PracticeConfig, adapter: object = None, dataset: Optional[str] = None
                     ) -> CalibrationData:
    """The config's calibration data (`dataset`, spec.dataset unless given: a spec.prior stage's own): texts for a
    text model, image+prompt samples for a VLM config (every image decoded here, so a broken one is named before
    any weight is read; audio or video that `adapter`'s calibration does not take, or that this environment
    cannot decode, is refused here too)."""
    dataset = dataset or config.spec.dataset
    if config.is_vlm:
        model = getattr(adapter, "model_type", None) or "the model"
        samples = load_vlm_samples(dataset, config.spec.default_text, config.source_dir,
                                   accepts=getattr(adapter, "calibration_media", MEDIA), model=model)
        getattr(adapter, "processor", None)  # built now (files only): a missing dependency is named before any weight
        return samples
    return load_texts(dataset, config.source_dir)


def _check_output(request: QuantizeRequest, formats: int = 1) -> None:
    """The output's checks, the same in a dry run and a real run; only a real run recovers a killed run's
    leftovers first (recovery renames directories). `formats`: how many savers write (each needs the room)."""
    check_save_path(request.save_path, request.overwrite, request.model_path, dry_run=request.dry_run)
    if not request.resume:  # starting over: what a killed run left for --resume goes, and the log says so
        discard_resumable(request.save_path, apply=not request.dry_run)
    # stat() of the input files only: a disk too small is found before the first weight is read
    check_free_space(request.save_path, formats * estimate_output_bytes(request.model_path), request.overwrite)


def _prepare(request: QuantizeRequest, in_rank: bool = False) -> _Job:
    """Every cheap check, in the order that fails fastest, then the model and the layer plan. `in_rank`: called
    by a spawned dp_layer_wise rank, after its launcher has checked and logged all of it."""
    require_model_dir(request.model_path)
    request = with_model_type(request)
    entry = resolve(request.model_type, request.model_path)  # an unknown model type fails before anything else
    config = load_practice(request, entry)  # fail fast: a YAML typo must not cost a model load
    if config.translation is not None and not in_rank:
        config.translation.log(log)  # what every modelslim_v0 key became
    _check_output(request, len(config.spec.save))
    # a bad MSMODELSLIM_ACTIVATION_MEMORY_MIB, MSMODELSLIM_SPILL_DIR or MSMODELSLIM_HEAP_REUSE_MIB fails here,
    # before any weight is read
    spill = ActivationSpill.from_env(request.save_path)
    reuse_threshold_bytes()
    spill = None if request.dry_run else spill  # checked in a dry run too, used only by a real one
    runner = choose_runner(config, request.device)
    refuse_duplicate_savers(config)
    refuse_steps_the_format_lacks(config)
    refuse_smoothing_after_online_rotation(config)
    refuse_steps_around_flatquant(config)
    adapter = create_adapter(request.model_type, str(request.model_path), request.trust_remote_code, entry)
    refuse_mismatched_modality(config, adapter, request.model_type)
    prior_results = PriorResults(estimating=request.dry_run)
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape(),
                               mla=adapter.mla_shape(), prior=prior_results, model_dtype=adapter.global_dtype())
    processors = build_pipeline(config.spec.process, context)
    config.spec.calibration = _settled_precision(config.spec.calibration, processors, request.device.primary, in_rank)
    if runner == RunnerType.dp_layer_wise:
        refuse_undistributable(config.spec.process, processors)
    needs_data = any(p.needs_calibration for p in processors)
    calibration = load_calibration(config, adapter) if needs_data else []
    prior = prior_runs(config, runner, context, lambda dataset: load_calibration(config, adapter, dataset))
    device = request.device.primary
    ranks = f" x {data_parallel_world(request.device)} ranks" if runner == RunnerType.dp_layer_wise else ""
    # Planned on the empty (meta-device) model: a rule or scheme problem fails before any weight is read.
    skeleton = adapter.init_skeleton()
    plan = plan_layers(config, processors, skeleton, adapter.block_names(skeleton), adapter.structure)
    for stage in prior:
        for processor in stage.processors:
            processor.check_model(skeleton, adapter.block_names(skeleton))
    unread = adapter.unread_tensors(skeleton)  # names and headers only
    # the prior stages' data shape the main stage too (a learned rotation): a change of it refuses --resume
    fingerprinted = calibration + [sample for stage in prior for sample in stage.calibration] if prior else calibration
    fingerprint, resume_from = resume_point(request, config, runner, fingerprinted, adapter.block_names(skeleton))
    refuse_inconsistent_passthrough(processors, unread, request.model_path)
    if not in_rank:  # never silently: the user sees what the output holds beyond the model, and what it omits
        log_unread(unread)
    refuse_schemes_the_format_lacks(config, plan)
    refuse_split_fused_groups(plan, adapter.structure.fused_groups)
    quantized = [n for n, s in plan.items() if s != "FLOAT"]
    required = {save.type: required_tensors(skeleton, quantized, writer_class_of(save.type).TIED_ALIASES)
                for save in config.spec.save}
    if request.dry_run or (_launches_ranks(runner) and not in_rank):
        model = skeleton  # only the plan is needed here (the spawned ranks load for themselves)
    else:
        model_wise = runner == RunnerType.model_wise
        model = adapter.load_weights(skeleton, device, load_layers=model_wise, defer_output_head=not model_wise)
    if not in_rank:
        log.info("runner %s on %s%s; %s", runner.value, request.device, ranks,
                 f"{len(calibration)} calibration samples" if needs_data else "no calibration data needed")
        log.info("plan: %s", summarize_plan(plan))
        if len(config.spec.save) > 1:
            log.info("%d output formats from one calibration: %s", len(config.spec.save),
                     ", ".join(f"{save.type} in {request.save_path / SUBFOLDERS[save.type]}" for save in config.spec.save))
        for i, stage in enumerate(prior):
            log.info("spec.prior[%d]: %s on %d calibration samples, before the main stage", i,
                     ", ".join(type(p).__name__ for p in stage.processors), len(stage.calibration))
    return _Job(config, runner, adapter, processors, calibration, model, plan, spill, required, unread,
                adapter.checkpoint.names(), fingerprint, resume_from, prior, prior_results)


def _settled_precision(calibration: CalibrationConfig, processors: list, device: torch.device,
                       quiet: bool) -> CalibrationConfig:
    """`spec.calibration.precision: auto` settled for the run's device, before the fingerprint and the saved
    practice, which record the choice."""
    ranges_only = any(p.range_statistics for p in processors if p.needs_calibration)
    settled = calibration.resolved(device, ranges_only)
    if calibration.precision == "auto" and not quiet:
        kind = "CPU" if device.type == "cpu" else device.type.upper()
        why = (f"this {kind} multiplies bfloat16 in hardware" if settled.precision == "bfloat16" else
               "no step collects only ranges" if not ranges_only else f"no bfloat16 matmul units on this {kind}")
        log.info("spec.calibration.precision auto: %s (%s); the forwards that collect only ranges (smoothing's "
                 "max |x|, static min/max) run in it", settled.precision, why)
    return settled


def _execute(job: _Job, request: QuantizeRequest, collective: Collective, staging_note: Optional[Path] = None) -> _Written:
    """Calibrate, quantize and (on rank 0) write. Ranks other than 0 only compute and merge statistics."""
    bound_heap_growth()
    fault_point("loaded")
    needs_data = any(p.needs_calibration for p in job.processors)
    device = collective.device if collective.distributed else request.device.primary
    if job.runner == RunnerType.model_wise and device.type != "cpu":
        job.model.to(device)
    batches = job.adapter.handle_dataset(job.calibration, device) if needs_data else []
    batches = contiguous_share(batches, collective.rank, collective.world)
    layer_wise = job.runner != RunnerType.model_wise
    writes = collective.rank == 0
    description, warnings = {}, []
    run_prior(job, device, collective)
    resume = job.resume_from
    staged = staged_directory(request.save_path, request.overwrite, resume.staging if resume else None)
    with staged if writes else nullcontext() as staging:
        if staging_note is not None and writes:  # lets the launcher remove it if this rank is killed
            staging_note.write_text(str(staging))
        writers = make_writers(job, staging) if writes else {}
        writer = None if not writes else (next(iter(writers.values())) if len(writers) == 1 else FanOutWriter(writers))
        checkpoints = None
        if writes and job.fingerprint is not None:
            checkpoints = BlockCheckpoints.from_env(staging, job.fingerprint, job.adapter.block_names(job.model))
            if resume is not None:  # the writer first: it takes back shards that the killed run had renamed
                writer.restore_state(resume.writer_state)
                checkpoints.discard_later_work(staging, resume, subfolders(job, staging))
            for directory in subfolders(job, staging):  # each format's shard-rename journal survives a kill too
                (directory / RESUME_STATE.parent).mkdir(exist_ok=True)
        try:
            stats = run_blocks(job.adapter, job.model, job.processors, writer, batches, device, layer_wise,
                               collective, job.spill, job.unread, job.config.spec.calibration.early_stop_rule(),
                               checkpoints, resume, job.config.spec.calibration.reduced_precision(),
                               quantized_inputs=job.config.spec.calibration.next_block_inputs == "quantized")
        finally:
            if checkpoints is not None:
                checkpoints.settle()  # a checkpoint still being written ends before its directory may be removed
        if writes:
            description, warnings = finish_outputs(job, request, writers, staging)
            if checkpoints is not None:
                checkpoints.remove()
                for directory in subfolders(job, staging):
                    shutil.rmtree(directory / RESUME_STATE.parent, ignore_errors=True)
    return _Written(description, warnings, stats, collective.max_float(peak_rss_mib()))


def _estimate(job: _Job, request: QuantizeRequest, started: float) -> RunEstimate:
    """Time one block of the real run and extrapolate (app/estimate.py); throwaway writes go into a hidden
    directory beside the output (the disk that will receive it), removed afterwards."""
    savers = {save.type: save for save in job.config.spec.save}
    factories = {kind: (lambda directory, save=save: make_writer(job, save, directory)) for kind, save in savers.items()}
    tied = {kind: writer_class_of(kind).TIED_ALIASES for kind in savers}
    scratch = Path(tempfile.mkdtemp(prefix=".msmodelslim-estimate-", dir=receiving_directory(request.save_path)))
    try:
        startup = time.time() - request.started_at if request.started_at else time.perf_counter() - started
        estimate = estimate_run(job, request, startup, factories, tied, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for line in estimate.lines():  # the CLI prints them; the log keeps them for API callers too
        log.debug("%s", line)
    return estimate


def _quiet_unless_rank0(rank: int) -> None:
    """One rank speaks for all (and shows the progress bars); the others only report errors, unless debugging."""
    if rank != 0 and level_from_env() > logging.DEBUG:
        logging.getLogger("msmodelslim").setLevel(logging.ERROR)


def _quantize_rank(collective: Collective, request: QuantizeRequest, rundir: Path) -> _Written:
    """Body of one spawned dp_layer_wise rank (core/distributed.py calls it)."""
    setup_logging()
    _quiet_unless_rank0(collective.rank)
    return _execute(_prepare(request, in_rank=True), request, collective, rundir / "staging")


RUNDIR_PREFIX = "msmodelslim-dp-"


def _remove_stale_rundirs() -> None:
    """Run directories of launchers that were killed outright (SIGKILL leaves no chance to clean up)."""
    for rundir in Path(tempfile.gettempdir()).glob(f"{RUNDIR_PREFIX}*"):
        try:
            pid = int((rundir / "owner").read_text())
            os.kill(pid, 0)
            continue  # its launcher is alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # no readable owner (being created, or not ours): leave it
        note = rundir / "staging"
        if note.is_file():
            shutil.rmtree(note.read_text(), ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
        log.info("removed %s left by a killed dp_layer_wise launcher", rundir)


def _run_spawned_ranks(request: QuantizeRequest) -> _Written:
    _remove_stale_rundirs()
    with tempfile.TemporaryDirectory(prefix=RUNDIR_PREFIX) as name:
        rundir = Path(name)
        (rundir / "owner").write_text(str(os.getpid()))
        try:
            # the practice was accepted (or asked for) in this process: the ranks must not ask again
            rank_request = replace(request, allow_default_practice=True)
            return spawn_ranks(request.device.kind, request.device.indices, rundir, _quantize_rank, rank_request, rundir)
        except BaseException:
            note = rundir / "staging"
            if note.is_file():  # rank 0 may have been stopped before it could remove its staging directory
                shutil.rmtree(note.read_text(), ignore_errors=True)
            raise


def quantize(request: QuantizeRequest) -> QuantizeReport:
    started = time.perf_counter()
    if torchrun_world() > 1:
        _quiet_unless_rank0(int(os.environ.get("RANK", "0")))
    request = with_model_type(request)  # _finish and the spawned ranks need the name
    job = _prepare(request)
    report = QuantizeReport(request.save_path, job.plan)
    if job.config.translation is not None:
        report.translated_config = job.config.translation.to_yaml()
    if request.dry_run:
        if request.estimate:  # after every check: a refusal still comes before any weight is read
            report.estimate = _estimate(job, request, started)
        return report
    if _launches_ranks(job.runner):
        written = _run_spawned_ranks(request)
    elif job.runner == RunnerType.dp_layer_wise:  # one rank of a torchrun job
        with torchrun_group(request.device.kind, request.device.indices) as collective:
            written = _execute(job, request, collective)
    else:
        written = _execute(job, request, LOCAL)
    report.description, report.warnings = written.description, written.warnings
    for warning in report.warnings:
        log.warning("format check: %s", warning)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mib = max(peak_rss_mib(), written.peak_rss_mib)
    stats = written.stats
    if job.resume_from is not None:
        log.info("resumed run: computed %d of %d blocks", stats.processed_blocks, stats.blocks)
    log.info("calibration: %d batches, %d tokens", stats.calibration_batches, stats.calibration_tokens)
    if stats.last_block_batches is not None and stats.last_block_batches < stats.calibration_batches:
        log.info("calibration stopped early (spec.calibration): the last block was calibrated on %d of the %d batches",
                 stats.last_block_batches, stats.calibration_batches)
    if report.description:
        # FlatQuant's types never set model_quant_type (formats.md A.2): named beside it, or a W4A4 model reads FLOAT
        unranked = sorted({t for t in report.description.values() if isinstance(t, str) and split_flat_tag(t)[1]})
        kind = report.description["model_quant_type"] + "".join(f", {t} layers" for t in unranked)
        log.info("saved %s (%s) in %.1f s, peak RSS %.0f MiB (largest rank)", request.save_path, kind,
                 report.seconds, report.peak_rss_mib)
    return report
