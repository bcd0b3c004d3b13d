"""Use case: check any checkpoint directory (ascendv1 or compressed-tensors) against what its engine's loader
requires, after finishing or undoing a replacement of it that a killed run left half done; given the checkpoint it
was written from, also that every input tensor reached it (or was consumed for a documented reason)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors, is_compressed_tensors
from msmodelslim.format.fan_out import SUBFOLDERS
from msmodelslim.format.mindie_checker import check_mindie, is_mindie
from msmodelslim.format.findings import Finding
from msmodelslim.format.integrity import unaccounted_source_tensors
from msmodelslim.format.staging import incomplete_reason, recover
from msmodelslim.model.packed_checkpoint import open_checkpoint
from msmodelslim.model.hf_config import require_local_dir
from msmodelslim.model.rebuild import loader_module_names


def _require_directory(path: Path) -> None:
    """A clear message naming a path that is not there (a typo is the usual cause), before any format guess."""
    if not path.exists():
        raise InvalidModelError(f"{path} does not exist; give the directory of a checkpoint written by 'quant' or "
                                f"'convert'")
    if not path.is_dir():
        raise InvalidModelError(f"{path} is not a directory; give the directory of a checkpoint, not a file in it")


SHOWN_MISSING = 20  # one error line per missing input tensor up to this many, then a count


def source_tensor_findings(path: Path, model_path: Path) -> list[Finding]:
    """One error per tensor of the input checkpoint `model_path` that the checkpoint at `path` does not account
    for (format/integrity.py says how a tensor may be accounted for)."""
    # pack-quantized weights count as their `.weight` (their parts are its storage), as quant reads them
    source = open_checkpoint(require_local_dir(model_path, "--model_path"))
    missing = unaccounted_source_tensors(source.names(), path)
    findings = [Finding("error", f"tensor {name} of {model_path} is missing: not written, not part of a "
                                 f"quantized linear's tensors, not a documented consumed tensor")
                for name in missing[:SHOWN_MISSING]]
    if len(missing) > SHOWN_MISSING:
        findings.append(Finding("error", f"... and {len(missing) - SHOWN_MISSING} more tensor(s) of {model_path} "
                                         f"are missing"))
    return findings


def check_checkpoint(path: Path, model_path: Optional[Path] = None) -> tuple[list[str], list[Finding]]:
    """(what recovery did, the findings). With `model_path` (the checkpoint it was written from), every input
    tensor must also be accounted for in the output."""
    recovered = recover(path)  # first: it may put a checkpoint back at a path that does not exist yet
    _require_directory(path)
    formats = [path / folder for folder in SUBFOLDERS.values() if (path / folder).is_dir()]
    if is_mindie(path):
        findings = check_mindie(path)
    elif (path / DESCRIPTION).is_file():
        findings = check_ascendv1(path)
    elif is_compressed_tensors(path):
        findings = check_compressed_tensors(path, loader_module_names(path, False))  # targets use loaded names
    elif formats and not (path / "config.json").exists():  # one run's several formats (spec.save, two savers)
        findings = []
        for folder in formats:
            _, found = check_checkpoint(folder, model_path)
            findings.extend(Finding(f.level, f"{folder.name}/: {f.message}") for f in found)
        model_path = None  # checked per folder
    else:
        raise ConfigError(f"{path} is neither an ascendv1 checkpoint ({DESCRIPTION} is missing), a MindIE one "
                          f"(no quant_model_description_<type>.json) nor a compressed-tensors one (no "
                          f"quantization_config in config.json)")
    reason = incomplete_reason(path)
    if reason:  # e.g. a staging directory whose run was killed after writing the description
        findings.insert(0, Finding("error", f"the checkpoint is not complete: {reason}"))
    if model_path is not None:
        findings.extend(source_tensor_findings(path, model_path))
    return recovered, findings
