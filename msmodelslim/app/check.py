"""Use case: check any checkpoint directory (ascendv1 or compressed-tensors) against what its engine's loader
requires, after finishing or undoing a replacement of it that a killed run left half done."""
from __future__ import annotations

from pathlib import Path

from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors, is_compressed_tensors
from msmodelslim.format.findings import Finding
from msmodelslim.format.staging import incomplete_reason, recover


def _require_directory(path: Path) -> None:
    """A clear message naming a path that is not there (a typo is the usual cause), before any format guess."""
    if not path.exists():
        raise InvalidModelError(f"{path} does not exist; give the directory of a checkpoint written by 'quant' or "
                                f"'convert'")
    if not path.is_dir():
        raise InvalidModelError(f"{path} is not a directory; give the directory of a checkpoint, not a file in it")


def check_checkpoint(path: Path) -> tuple[list[str], list[Finding]]:
    """(what recovery did, the findings)."""
    recovered = recover(path)  # first: it may put a checkpoint back at a path that does not exist yet
    _require_directory(path)
    if (path / DESCRIPTION).is_file():
        findings = check_ascendv1(path)
    elif is_compressed_tensors(path):
        findings = check_compressed_tensors(path)
    else:
        raise ConfigError(f"{path} is neither an ascendv1 checkpoint ({DESCRIPTION} is missing) nor a "
                          f"compressed-tensors one (no quantization_config in config.json)")
    reason = incomplete_reason(path)
    if reason:  # e.g. a staging directory whose run was killed after writing the description
        findings.insert(0, Finding("error", f"the checkpoint is not complete: {reason}"))
    return recovered, findings
