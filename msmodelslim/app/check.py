"""Use case: check any checkpoint directory (ascendv1 or compressed-tensors) against what its engine's loader
requires, after finishing or undoing a replacement of it that a killed run left half done."""
from __future__ import annotations

from pathlib import Path

from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors, is_compressed_tensors
from msmodelslim.format.findings import Finding
from msmodelslim.format.staging import incomplete_reason, recover


def check_checkpoint(path: Path) -> tuple[list[str], list[Finding]]:
    """(what recovery did, the findings)."""
    recovered = recover(path)
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
