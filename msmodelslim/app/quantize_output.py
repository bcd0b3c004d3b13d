"""The output side of a quantize run: where each format's files go, its writer, and completing it (files, the
practice used, the format checklist, completeness against the input) inside the staging directory."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from msmodelslim.core.config import PracticeConfig
from msmodelslim.core.errors import FormatCheckError
from msmodelslim.core.faults import fault_point
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors
from msmodelslim.format.compressed_tensors.writer import CompressedTensorsWriter
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.fan_out import SUBFOLDERS
from msmodelslim.format.integrity import verify_complete, verify_source_tensors
from msmodelslim.format.mindie import MindIEWriter
from msmodelslim.format.mindie_checker import check_mindie
from msmodelslim.format.staging import DIR_MODE
from msmodelslim.model.rebuild import loaded_names_of

if TYPE_CHECKING:
    from msmodelslim.app.quantize import _Job
    from msmodelslim.app.quantize_request import QuantizeRequest


def saved_practice(config: PracticeConfig) -> dict:
    """The practice as the output's `*_best_practice.yaml` holds it (also what the resume fingerprint hashes)."""
    return config.model_dump(mode="json", exclude_none=True, exclude={"source_dir"})


def output_directories(config: PracticeConfig, staging: Path) -> dict[str, Path]:
    """{saver type: where its files go}: the staging directory itself for one saver, a subfolder per format for
    several (format/fan_out.py)."""
    if len(config.spec.save) == 1:
        return {config.spec.save[0].type: staging}
    return {save.type: staging / SUBFOLDERS[save.type] for save in config.spec.save}


def make_writer(job: _Job, save, directory: Path):
    adapter = job.adapter
    if save.type == "compressed_tensors":
        return CompressedTensorsWriter(directory, save.part_file_size, adapter.global_dtype(), adapter.original_dtype,
                                       config_name=loaded_names_of(adapter))
    if save.type == "mindie_format_saver":
        return MindIEWriter(directory, save.part_file_size, adapter.original_dtype)
    return AscendV1Writer(
        directory,
        save.part_file_size,
        adapter.global_dtype(),
        is_row_parallel=adapter.structure.is_row_parallel,
        dtype_for=adapter.original_dtype,
    )


def make_writers(job: _Job, staging: Path) -> dict[str, object]:
    """{saver type: its writer}, each writing into its output directory (created here)."""
    writers = {}
    for save in job.config.spec.save:
        directory = output_directories(job.config, staging)[save.type]
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        writers[save.type] = make_writer(job, save, directory)
    return writers


def finish_one(job: _Job, request: QuantizeRequest, save, writer, directory: Path, edits: OutputEdits
                ) -> tuple[dict, list[str]]:
    """Complete one format's output in `directory`: its files, the practice used, the format checklist."""
    if save.type == "compressed_tensors":
        written = writer.finish(request.model_path, edits, [n for n, s in job.plan.items() if s == "FLOAT"])
        description = {"model_quant_type": written.get("format", "dense")}
        findings = check_compressed_tensors(directory, loaded_names_of(job.adapter))
    elif save.type == "mindie_format_saver":
        description = writer.finish(request.model_path, edits)
        findings = check_mindie(directory, list(job.plan), job.adapter.structure.fused_groups)
    else:
        description = writer.finish(request.model_path, edits)
        findings = check_ascendv1(directory, list(job.plan), job.adapter.structure.fused_groups)
    fault_point("description")
    practice_file = directory / f"{request.model_type}_best_practice.yaml"
    saved = saved_practice(job.config)
    if len(job.config.spec.save) > 1:  # each folder records the config that writes exactly it
        saved["spec"]["save"] = [s for s in saved["spec"]["save"] if s["type"] == save.type]
    practice_file.write_text(yaml.safe_dump(saved, sort_keys=False, allow_unicode=True))
    warnings = sorted({f.message.split(": ", 1)[1] for f in findings if f.level == "warning"})
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise FormatCheckError(f"the written checkpoint fails the {save.type} checklist:\n  " + "\n  ".join(errors[:20]))
    verify_complete(directory, job.required[save.type])
    verify_source_tensors(directory, job.source_tensors, request.model_path)
    return description, warnings


def finish_outputs(job: _Job, request: QuantizeRequest, writers: dict[str, object], staging: Path
            ) -> tuple[dict, list[str]]:
    """Complete every format's output inside `staging` (checked each); the staged move puts them in place at once.
    The description: the one format's, or {"model_quant_type": "<type> (<saver>), ...", <saver>: its own}."""
    edits = OutputEdits()
    for processor in job.processors:
        edits = edits.merge(processor.output_edits())
    family_edits = getattr(job.adapter, "output_edits", None)  # third-party adapters need not have it
    if family_edits is not None:  # the family's own entries (e.g. the DeepSeek-V3.2 indexer's)
        edits = edits.merge(family_edits())
    directories = output_directories(job.config, staging)
    results = {save.type: finish_one(job, request, save, writers[save.type], directories[save.type], edits)
               for save in job.config.spec.save}
    if len(results) == 1:
        return next(iter(results.values()))
    description = {saver: desc for saver, (desc, _) in results.items()}
    description["model_quant_type"] = ", ".join(f"{d['model_quant_type']} ({saver})" for saver, (d, _) in results.items())
    warnings = sorted({f"{saver}: {w}" for saver, (_, ws) in results.items() for w in ws})
    return description, warnings


def subfolders(job: _Job, staging: Path) -> list[Path]:
    """The formats' own directories inside `staging` (none with one saver: it writes into `staging` itself)."""
    return [d for d in output_directories(job.config, staging).values() if d != staging]
