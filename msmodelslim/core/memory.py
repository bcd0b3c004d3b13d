"""Keep the C heap from growing block after block.

Layer-wise calibration allocates and frees the same few-MiB activation tensors for every block. glibc serves a
freed mmapped chunk's size and below from its heap afterwards (its mmap threshold rises on every such free, up
to 32 MiB), so those tensors land in the heap between longer-lived small allocations, and the freed space
there is not returned to the system. Measured on the 1.5B-shaped synthetic checkpoint with static W8A8
calibration: 182 MiB in use but 1.3 GiB of free heap held after 28 blocks (RSS 1.1 → 2.3 GiB), and 5.2 GiB
peak on the 7B shape. Fixing the mmap threshold (which also stops it adjusting) sends every allocation above
it to its own mapping, returned to the system when freed; `release_free_heap` hands back what is still free
in the heap after each block.

That bound has a price inside a block: a calibration forward allocates the same activation-sized temporaries
batch after batch, and with every one of them a fresh mapping, each batch faults all of them in again, 4 KiB at a
time. `heap_reused` lifts the bound while one block is processed (or an evaluation runs) and puts it
back, trimming the heap, when it is done.

All are no-ops where the C library is not glibc. A threshold the user set in MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ wins.

Also the probes of resident memory that the dry-run estimate (app/estimate.py) measures with.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger

log = get_logger("memory")

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's default
REUSE_THRESHOLD_BYTES = 1 << 30  # both thresholds inside heap_reused (mallopt takes a C int: below 2 GiB)
REUSE_ENV = "MSMODELSLIM_HEAP_REUSE_MIB"


def reuse_threshold_bytes() -> int:
    """The largest allocation `heap_reused` serves from the heap: MSMODELSLIM_HEAP_REUSE_MIB (1 to 1024), 1 GiB
    by default. A ConfigError names a value out of range."""
    raw = os.environ.get(REUSE_ENV)
    if raw is None:
        return REUSE_THRESHOLD_BYTES
    try:
        mib = int(raw)
    except ValueError:
        mib = 0
    if not 1 <= mib <= REUSE_THRESHOLD_BYTES >> 20:
        raise ConfigError(f"{REUSE_ENV}={raw!r}: expected a whole number of MiB from 1 to 1024 (the largest block "
                          f"temporary served from the heap; smaller values trade time for memory)")
    return mib << 20


@lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc has both; musl and macOS lack mallopt or malloc_trim)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _tunable_libc() -> Optional[ctypes.CDLL]:
    """glibc, unless the user tuned its thresholds in the environment (theirs win)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return None
    return _glibc()


def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process. True when it took effect."""
    libc = _tunable_libc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    log.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, done)
    return done


@contextmanager
def heap_reused() -> Iterator[None]:
    """While a loop repeats forwards whose temporaries have the same sizes every time (a block's calibration
    batches, an evaluation's windows), serve every allocation from glibc's heap and keep what is freed there, so
    the next repeat reuses pages already faulted in; on the way out, the bound of `bound_heap_growth` again and
    the heap's free pages handed back (malloc_trim releases free pages anywhere in the heap, so what stays
    resident is what is still alive: a block's outputs, its quantized weights).

    Measured on one SmolLM2-135M decoder layer, 8 batches of 16 x 512 tokens under bfloat16 autocast (two
    cores): 4.3-4.6 s and ~1.05 M minor page faults with every allocation above 1 MiB its own mapping; 2.6-2.7 s
    and no faults with the heap kept. The price is memory: block after block the heap fragments (small
    long-lived allocations land in the holes the large temporaries leave), so later blocks touch more of it than
    the first. On SmolLM2 with GPTQ W4A4 (online rotations, 4 batches of 16 x 512) the per-block peak RSS grew
    from 1.42 to 1.80 GiB over the 30 blocks; on a 10-layer truncation the heap held 310 MiB in use throughout
    while its size grew from 834 to 1032 MiB.
    MSMODELSLIM_HEAP_REUSE_MIB caps what is served from the heap (`reuse_threshold_bytes`; larger temporaries
    get mappings of their own): docs/benchmarks.md, "Heap reuse inside a block", has the time and memory of
    several caps. A no-op where the C library is not glibc or the user set the thresholds; leaves the allocator
    as `bound_heap_growth` sets it."""
    libc = _tunable_libc()
    if libc is None:
        yield
        return
    reuse = reuse_threshold_bytes()
    libc.mallopt(M_TRIM_THRESHOLD, reuse)
    libc.mallopt(M_MMAP_THRESHOLD, reuse)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.malloc_trim(0)


HUGE_PAGE_BYTES = 2 << 20  # x86-64 and most arm64 kernels: transparent huge pages of 2 MiB
MADV_HUGEPAGE = 14  # from linux/mman.h


@lru_cache(maxsize=1)
def _madvise():
    libc = _glibc()
    if libc is None or not hasattr(libc, "madvise"):
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def empty_on_huge_pages(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory the kernel may back with transparent huge pages.

    Every large allocation is a fresh mapping (see `bound_heap_growth`), so the first write to it faults in
    4 KiB pages one by one; a 2 MiB page costs one fault. On a machine whose THP mode is `madvise` (the common
    default) widening a 7B-shaped MLP weight (11008 x 4096) to float32 took 130-150 ms on 4 KiB pages against
    40 ms on 2 MiB ones. The first huge pages a process gets cost more while the kernel assembles them (a
    first block 2-4x slower, then faster from the second on, as freed huge pages are reused); over a whole
    7B-shaped w8a8_dynamic run the widening and the int8 codes on huge pages took 42.3 s against 56.8 s with
    the page cache warm, 54.7 s against 63.1 s cold. Where THP is `always` this changes nothing; where it is
    `never`, or madvise is missing, it is a plain torch.empty.
    """
    tensor = torch.empty(shape, dtype=dtype)
    madvise = _madvise()
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES, end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if madvise is not None and last > first:  # only whole huge pages inside the tensor's own mapping
        madvise(first, last - first, MADV_HUGEPAGE)  # a hint: a refusal leaves ordinary pages
    return tensor


def release_free_heap() -> None:
    """Return the heap's free pages to the system (glibc malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ---- probes (the dry-run estimate measures with them) ----
def _status_bytes(field: str) -> Optional[int]:
    """A size line of /proc/self/status ("VmRSS:", "VmHWM:") in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; elsewhere the peak so far)."""
    rss = _status_bytes("VmRSS:")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> Optional[int]:
    """The peak resident bytes since `reset_peak_rss` (VmHWM), None where the kernel does not say."""
    return _status_bytes("VmHWM:")
