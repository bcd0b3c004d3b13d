"""The reader a written checkpoint needs: ascendv1 (quant_model_description.json) or compressed-tensors (config.json's
quantization_config). Both rebuild the same QuantLinears, so what reads one scores the other the same way."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.ascendv1.reader import (load_ascendv1, read_valid_description,
                                                require_described_tensors)
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.format.compressed_tensors.checker import is_compressed_tensors
from msmodelslim.format.compressed_tensors.reader import (load_compressed_tensors, read_quantization_config,
                                                          require_quantized_tensors)
from msmodelslim.format.fan_out import SUBFOLDERS
from msmodelslim.format.staging import incomplete_reason
from msmodelslim.model.rebuild import loader_module_names


def _is_compressed_tensors(path: Path) -> bool:
    return not (path / DESCRIPTION).is_file() and is_compressed_tensors(path)


def check_quantized_checkpoint(path: Path, flag: str, trust_remote_code: bool = False) -> None:
    """Before any model is loaded: the checkpoint is complete, its description or quantization_config is one this
    package rebuilds, and its shards hold the tensors they name (headers only)."""
    if not _is_compressed_tensors(path):
        require_described_tensors(path, read_valid_description(path), flag)  # its errors name the other layouts
        return
    reason = incomplete_reason(path)
    if reason:  # e.g. the staging directory of a killed run
        raise InvalidModelError(f"{path} is not a complete checkpoint: {reason}")
    require_quantized_tensors(path, read_quantization_config(path), flag, loader_module_names(path, trust_remote_code))


def load_quantized_checkpoint(path: Path, trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint's model, each quantized linear computing what its kernel computes."""
    if _is_compressed_tensors(path):
        return load_compressed_tensors(path, trust_remote_code)
    return load_ascendv1(path, trust_remote_code)


def own_output_folder(path: Path) -> Path:
    """The folder to score in an output `quant` wrote: `path` itself, or where it saved several formats (one folder
    each), the ascendv1 one (else the compressed-tensors one); both hold the same quantization."""
    for folder in SUBFOLDERS.values():  # ascendv1 first
        if (path / folder).is_dir():
            return path / folder
    return path
