"""Free disk space for an output, checked before any weight is read (a full disk found after an hour of
calibration costs the hour; found before, it costs a second).

The estimate is deliberately simple and errs high: the sizes of the input's `*.safetensors` files (int8/int4
codes of a float checkpoint are smaller than the floats, and a conversion carries its tensors over) plus the
side files every output copies (config, tokenizer).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from msmodelslim.core.errors import DiskSpaceError
from msmodelslim.format.hf_files import COPIED_SUFFIXES
from msmodelslim.format.staging import writes_in_place


def estimate_output_bytes(source: Path) -> int:
    """Upper bound of the bytes an output written from the checkpoint `source` needs (sizes only: nothing read)."""
    files = [p for p in Path(source).iterdir() if p.is_file()]  # is_file follows links (Hugging Face cache)
    weights = sum(p.stat().st_size for p in files if p.name.endswith(".safetensors"))
    side = sum(p.stat().st_size for p in files if p.name.endswith(COPIED_SUFFIXES))
    return weights + side


def receiving_directory(save_path: Path) -> Path:
    """Where the output is staged: inside `save_path` when it is a mount point, else beside it."""
    save_path = Path(save_path).expanduser().resolve()
    return save_path if writes_in_place(save_path) else save_path.parent


def _size(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def check_free_space(save_path: Path, needed: int, overwrite: bool = False) -> None:
    """Refuse (DiskSpaceError) when the disk that receives the output has less free space than `needed`.
    With --overwrite the previous checkpoint stays until the new one is complete, so it frees nothing."""
    where = receiving_directory(save_path)
    free = shutil.disk_usage(where).free
    if free >= needed:
        return
    kept = " (the previous checkpoint there is kept until the new one is complete)" if overwrite else ""
    raise DiskSpaceError(
        f"not enough free space for --save_path {save_path}: the output needs up to {_size(needed)} (the size of "
        f"the input's weights and config files) but {where} has {_size(free)} free{kept}; nothing was read or "
        f"written. Free {_size(needed - free)} there, or choose a --save_path on another disk"
    )
