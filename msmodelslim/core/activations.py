"""Calibration activations between decoder blocks, spilled to disk when they are large.

Each batch's hidden states go from one block to the next. With many or long calibration samples on a wide
model (512 × 4096 tokens × hidden 7168 × fp32 is 60 GB) they would not fit in memory, so past a budget the
runner moves each one into a file-backed shared mapping: the tensor keeps its identity (its storage is swapped
in place, so whoever holds it, such as the adapter's forward generator, sees the new storage), its pages are
dropped from the process as soon as they are written (the kernel's page cache writes them back and may evict
them), and they are read back from the file when the next block's forward touches them. The file is unlinked
as soon as it is mapped, so a crash leaves nothing behind and the disk space is returned when the tensor dies.

The budget is `MSMODELSLIM_ACTIVATION_MEMORY_MIB` (default 4096), compared with the bytes of one block's inputs
and outputs over all batches (both are alive while a block runs). Files go to `MSMODELSLIM_SPILL_DIR`, by
default the directory the output is saved in (a disk the user chose for large files, unlike /tmp, which may be
memory).
"""
from __future__ import annotations

import math
import mmap
import os
import tempfile
import weakref
from pathlib import Path
from typing import Iterable

import torch

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger

log = get_logger("activations")

BUDGET_ENV = "MSMODELSLIM_ACTIVATION_MEMORY_MIB"
DIR_ENV = "MSMODELSLIM_SPILL_DIR"
DEFAULT_BUDGET_MIB = 4096


def budget_from_env() -> int:
    """The activation budget in bytes; a clear error for a value that is not a non-negative number."""
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_MIB))
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not math.isfinite(mib) or mib < 0:  # nan passes `< 0` and inf overflows int(): both are typos
        raise ConfigError(f"{BUDGET_ENV}={raw!r}: expected a number of MiB >= 0 (0 spills every activation)")
    return int(mib * 2**20)


class ActivationSpill:
    """Moves tensors to unlinked file-backed mappings under `directory` once `engage` finds them over budget."""

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.active = False
        self._mappings: dict[int, weakref.ref] = {}  # storage address -> the live mapping at that address

    @classmethod
    def from_env(cls, save_path: Path) -> "ActivationSpill":
        chosen = os.environ.get(DIR_ENV)
        if chosen and not Path(chosen).is_dir():
            raise ConfigError(f"{DIR_ENV}={chosen!r} is not a directory; give an existing directory for spilled "
                              f"calibration activations, or unset it to use the output's directory")
        directory = Path(chosen) if chosen else Path(save_path).resolve().parent
        return cls(directory, budget_from_env())

    def engage(self, activations: Iterable[torch.Tensor]) -> bool:
        """Decide from one block's inputs: spill when inputs plus outputs (same size) exceed the budget."""
        activations = list(activations)
        live = 2 * sum(t.numel() * t.element_size() for t in activations)
        on_cpu = all(t.device.type == "cpu" for t in activations)
        self.active = on_cpu and live > self.budget_bytes
        if live > self.budget_bytes and not on_cpu:
            log.warning("calibration activations need %.0f MiB of device memory (budget %.0f MiB); only CPU "
                        "activations can be spilled to disk", live / 2**20, self.budget_bytes / 2**20)
        if self.active:
            log.info("calibration activations need %.0f MiB (budget %.0f MiB, %s): spilling them to %s",
                     live / 2**20, self.budget_bytes / 2**20, BUDGET_ENV, self.directory)
        return self.active

    def move_to_disk(self, tensor: torch.Tensor) -> None:
        """Swap `tensor`'s storage for a file-backed copy whose pages are then dropped from this process."""
        if not self.active or tensor.numel() == 0 or self._mapping_of(tensor) is not None:
            return
        nbytes = tensor.numel() * tensor.element_size()
        fd, path = tempfile.mkstemp(prefix="msmodelslim-act-", suffix=".bin", dir=self.directory)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)  # MAP_SHARED: dirty pages belong to the file, not to this process
        finally:
            os.close(fd)
            os.unlink(path)
        on_disk = torch.frombuffer(mapping, dtype=tensor.dtype).view(tensor.shape)
        with torch.no_grad():
            on_disk.copy_(tensor)
            tensor.set_(on_disk.untyped_storage(), 0, tensor.shape, on_disk.stride())
        self._remember(tensor.untyped_storage().data_ptr(), mapping)
        mapping.madvise(mmap.MADV_DONTNEED)

    def evict(self, tensor: torch.Tensor) -> None:
        """Drop a spilled tensor's pages that a forward has read back (the file keeps the data)."""
        mapping = self._mapping_of(tensor)
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)

    def _remember(self, address: int, mapping: mmap.mmap) -> None:
        def forget(ref: weakref.ref) -> None:  # the mapping is gone: its address may soon be anyone's
            if self._mappings.get(address) is ref:
                del self._mappings[address]

        self._mappings[address] = weakref.ref(mapping, forget)

    def _mapping_of(self, tensor: torch.Tensor):
        ref = self._mappings.get(tensor.untyped_storage().data_ptr())
        return ref() if ref is not None else None
