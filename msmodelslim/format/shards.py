"""Streaming tensors into size-bounded safetensors shards. Each tensor's bytes go to disk as soon as it is added
(on a writer thread, at most WRITE_BEHIND_BYTES behind), so a layer-wise run holds no more output than that,
whatever `part_file_size` is. Shards get temporary names until `finish`, which names them (the format decides
how) and writes the index.

A safetensors file is an 8-byte header length, a JSON header, then the data. The header (names, dtypes, offsets)
is only known once the shard is complete, so space for it is reserved in front of the data and filled, padded
with spaces as the format allows, when the shard is closed; a header that outgrows its reserve is put in front
by rewriting the file once.

A killed run can be resumed (core/resume.py): `state()` describes what is on disk after a finished block (closed
shards, the open shard's length), `sync()` makes those bytes durable, and `restore()` reopens the open shard and
cuts off whatever a later block had appended, so nothing written before the checkpoint is written again.
When checkpoints are kept (the staging directory has `.resume/`), `finish()` records its renames there first, so
that a run killed while naming the shards can be undone.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch

from msmodelslim.core.errors import ProcessingError
from msmodelslim.format.staging import RESUME_STATE
from msmodelslim.quantizer.primitives import all_finite

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


RENAMES = RESUME_STATE.parent / "shard-renames.json"  # finish()'s journal: [temporary name, final name] per shard


def fsync_path(path: Path) -> None:
    """Make a file's (or a directory's entries') bytes durable: a checkpoint must never name data a power cut loses."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# At most this many bytes of added tensors wait to be written (they stay in memory until then).
WRITE_BEHIND_BYTES = 256 << 20


class WriteBehind:
    """Writes tensors' bytes to open files on a thread of their own, in the order submitted, while the caller goes
    on computing: once the kernel's dirty pages pile up it throttles a writer to the disk's speed, and on a 7B
    checkpoint those writes were a third of a data-free run (docs/benchmarks.md). At most `limit` bytes wait at a
    time (a larger tensor waits alone). `drain()` returns once everything submitted is written; `barrier(action)`
    queues an action (fsyncs) that runs on the thread after everything submitted before it, and returns a wait
    for it that any thread may call. The first error of a write or an action (a full disk: OSError ENOSPC) is
    raised in the caller's thread by the next `submit` or `drain`, and by the wait of every later barrier; nothing
    submitted after it is written or run. The thread exits whenever the queue runs empty."""

    def __init__(self, limit: int = WRITE_BEHIND_BYTES) -> None:
        self.limit = limit
        self._jobs: deque[tuple[object, object, int]] = deque()  # (file, tensor, size) or (None, _Barrier, 0)
        self._pending = 0
        self._error: Optional[BaseException] = None
        self._running = False
        self._changed = threading.Condition()

    def submit(self, file, tensor: torch.Tensor) -> None:
        """Append `tensor`'s bytes (contiguous, on the CPU, not changed afterwards) to `file` at its position."""
        size = tensor.numel() * tensor.element_size()
        with self._changed:
            self._raise_error()
            while self._pending and self._pending + size > self.limit:
                self._changed.wait()
                self._raise_error()
            self._jobs.append((file, tensor, size))
            self._pending += size
            self._start()

    def barrier(self, action: Callable[[], None]) -> Callable[[], None]:
        """Run `action` on the writer thread once everything submitted so far is written; returns the wait."""
        barrier = _Barrier(action)
        with self._changed:
            self._raise_error()
            self._jobs.append((None, barrier, 0))
            self._start()
        return barrier.wait

    def _start(self) -> None:  # with self._changed held
        if not self._running:
            self._running = True
            threading.Thread(target=self._write_all, name="msmodelslim-shard-writer", daemon=True).start()

    def drain(self) -> None:
        with self._changed:
            while self._jobs:
                self._changed.wait()
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_all(self) -> None:
        while True:
            with self._changed:
                if not self._jobs:
                    self._running = False
                    return
                file, job, size = self._jobs[0]
                earlier = self._error  # nothing is written or run after a failure
            error = earlier or (job.run() if file is None else _append(file, job))
            with self._changed:
                self._error = self._error or error
                self._jobs.popleft()
                self._pending -= size
                self._changed.notify_all()
            if file is None:
                job.finish(error)


class _Barrier:
    """An action queued among the writes, and the event its waiters wait on."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.error: Optional[BaseException] = None
        self._done = threading.Event()

    def run(self) -> Optional[BaseException]:
        try:
            self.action()
        except BaseException as exc:
            return exc
        return None

    def finish(self, error: Optional[BaseException]) -> None:
        self.error = error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


def _append(file, tensor: torch.Tensor) -> Optional[BaseException]:
    """Write the tensor's bytes; the error, if any, for the caller's thread. file.write, not numpy's tofile: on a
    full disk it raises OSError with errno ENOSPC (tofile's has none); it releases the GIL for its system call."""
    try:
        file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    except BaseException as exc:
        return exc
    return None


class _OpenShard:
    """One safetensors file being written: data appended as it comes (by `writes`), header written on close; the
    file is only touched here once `writes` is drained."""

    def __init__(self, path: Path, reserve: int, writes: WriteBehind,
                 resume_at: Optional[tuple[dict[str, dict], int]] = None) -> None:
        self.path, self.reserve, self.writes = path, reserve, writes
        if resume_at is None:
            self.file = open(path, "wb")
            self.file.write(bytes(8 + reserve))
            self.entries: dict[str, dict] = {}
            self.offset = 0
            return
        # Resumed: the header space is rewritten whole on close; the data after the checkpoint's offset came from
        # blocks that will be processed again, so it is cut off.
        self.entries, self.offset = resume_at
        with open(path, "rb") as probe:
            header_length = int.from_bytes(probe.read(8).ljust(8, b"\0"), "little")
        if header_length not in (0, reserve) or path.stat().st_size < 8 + reserve + self.offset:
            raise ProcessingError(f"{path.name} was rewritten after the checkpoint (its header outgrew its reserve), "
                                  f"so it cannot be continued")
        self.file = open(path, "r+b")
        self.file.truncate(8 + reserve + self.offset)
        self.file.seek(8 + reserve + self.offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size:
            self.writes.submit(self.file, tensor)
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        self.entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + size]}
        self.offset += size

    def close(self) -> None:
        self.writes.drain()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
            self.file.close()
            return
        self.file.close()  # rare: more tensors than the reserve holds; put the header in front by copying once
        header = header.ljust(-(-len(header) // 8) * 8, b" ")
        moved = self.path.with_suffix(".moving")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 64 << 20)
        os.replace(moved, self.path)


class ShardStream:
    def __init__(self, out_dir: Path, limit_bytes: int) -> None:
        self.out_dir = out_dir
        self.limit = limit_bytes  # 0 = everything in one file
        # ~150 bytes of header per tensor: 1 MiB holds ~7000 tensors, enough for a 4 GB shard of MoE experts
        self.reserve = 4 << 20 if not limit_bytes else min(max(limit_bytes // 4096, 64 << 10), 4 << 20)
        self.names: list[str] = []
        self._seen: set[str] = set()
        self.total_bytes = 0
        self._open: Optional[_OpenShard] = None
        self._shards: list[tuple[Path, list[str]]] = []
        self._unsynced: list[Path] = []  # shards closed since the last sync_behind()
        self._writes = WriteBehind()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        if not all_finite(tensor):
            # a NaN/Inf scale or weight would load and serve garbage: never write one
            raise ProcessingError(f"{name} holds NaN or Inf values, so no checkpoint was written; the input "
                                  f"weights or calibration activations feeding it are not finite")
        size = tensor.numel() * tensor.element_size()
        if self.limit and self._open is not None and self._open.entries and self._open.offset + size >= self.limit:
            self.flush()
        if self._open is None:
            self._open = _OpenShard(self.out_dir / f".shard-{len(self._shards):05d}.tmp", self.reserve, self._writes)
        self._open.write(name, tensor)
        self.total_bytes += size
        self.names.append(name)

    def flush(self) -> None:
        if self._open is None:
            return
        self._open.close()
        self._shards.append((self._open.path, list(self._open.entries)))
        self._unsynced.append(self._open.path)
        self._open = None

    @property
    def shard_count(self) -> int:
        """Shards written so far plus the one still pending."""
        return len(self._shards) + (self._open is not None)

    def finish(self, shard_name: Callable[[int, int], str], index_name: Optional[str]) -> dict[str, str]:
        """Rename shard i of n (1-based) to shard_name(i, n); write {index_name} unless it is None.
        Returns the weight map {tensor name: file name}."""
        self.flush()
        self._writes.drain()  # a queued sync_behind() fsyncs the shards by their temporary names
        weight_map: dict[str, str] = {}
        count = len(self._shards)
        renames = [(path.name, shard_name(i, count)) for i, (path, _) in enumerate(self._shards, start=1)]
        journal = self.out_dir / RENAMES
        if journal.parent.is_dir():  # a resumed run must find the shards it checkpointed (removed with .resume/)
            journal.with_suffix(".tmp").write_text(json.dumps(renames), encoding="utf-8")
            fsync_path(journal.with_suffix(".tmp"))
            os.replace(journal.with_suffix(".tmp"), journal)
        for (path, names), (_, final) in zip(self._shards, renames):
            path.rename(self.out_dir / final)
            weight_map.update({n: final for n in names})
        if index_name is not None:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / index_name).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return weight_map

    # ---- resume --------------------------------------------------------------------------------------------
    def sync_behind(self) -> Callable[[], None]:
        """Make everything added so far durable, on the writer thread after the writes queued so far, while the
        caller goes on adding: returns the wait for it (a checkpoint written behind the next block waits before
        naming these bytes)."""
        closed, self._unsynced = self._unsynced, []
        file = self._open.file if self._open is not None else None  # closed only after the writes drain

        def make_durable() -> None:
            if file is not None:
                file.flush()
                os.fsync(file.fileno())
            for path in closed:
                fsync_path(path)

        return self._writes.barrier(make_durable)

    def sync(self) -> None:
        """Everything added so far on disk for good, before returning (`sync_behind`, waited for)."""
        self.sync_behind()()

    def state(self) -> dict:
        """What is on disk now, as JSON: enough for `restore` to continue after a kill."""
        open_shard = None
        if self._open is not None:
            open_shard = {"file": self._open.path.name, "entries": self._open.entries, "offset": self._open.offset}
        return {"limit": self.limit, "reserve": self.reserve, "total_bytes": self.total_bytes, "names": self.names,
                "closed": [[path.name, names] for path, names in self._shards], "open": open_shard}

    def restore(self, state: dict) -> None:
        """Continue from `state` in a staging directory a killed run left: undo an interrupted `finish`, remove
        shards begun after the checkpoint, reopen the open shard at the checkpoint's length."""
        if (state["limit"], state["reserve"]) != (self.limit, self.reserve):
            raise ProcessingError("the checkpoint's shard size differs from this run's (spec.save part_file_size)")
        journal = self.out_dir / RENAMES
        if journal.exists():  # killed while naming the shards: give them back their temporary names
            for temporary, final in json.loads(journal.read_text(encoding="utf-8")):
                if (self.out_dir / final).exists() and not (self.out_dir / temporary).exists():
                    os.replace(self.out_dir / final, self.out_dir / temporary)
            journal.unlink()
        owned = {name for name, _ in state["closed"]} | ({state["open"]["file"]} if state["open"] else set())
        for path in self.out_dir.glob(".shard-*"):
            if path.name not in owned:
                path.unlink()
        missing = sorted(n for n in owned if not (self.out_dir / n).is_file())
        if missing:
            raise ProcessingError(f"the checkpoint's shard files {missing} are missing from {self.out_dir}")
        self._shards = [(self.out_dir / name, list(names)) for name, names in state["closed"]]
        self.names = list(state["names"])
        self._seen = set(self.names)
        self.total_bytes = state["total_bytes"]
        self._open = None
        if state["open"]:
            self._open = _OpenShard(self.out_dir / state["open"]["file"], self.reserve, self._writes,
                                    (dict(state["open"]["entries"]), state["open"]["offset"]))
