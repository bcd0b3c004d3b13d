"""Data-parallel ranks for `dp_layer_wise`: how ranks merge statistics, how the calibration data is shared out,
and how the ranks are started.

Every rank walks the same block schedule on its own contiguous share of the calibration batches. Before a
processor turns its statistics into weights, the ranks merge them (min/max, sums, token rows gathered in rank
order), so every rank quantizes each block identically and feeds identical weights to the next forward. Only
rank 0 writes the checkpoint.

Two ways to start:
- one machine: `--device cuda:0,1`, `npu:0,1,2,3` or `cpu:0,1` (CPU processes, for testing) — the tool spawns
  one process per listed device (`spawn_ranks`);
- several machines: run the same command under `torchrun`, which sets WORLD_SIZE, RANK, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT (`torchrun_group`); each process uses the device LOCAL_RANK of `--device`.
Backends: gloo on CPU, nccl on CUDA, hccl on NPU.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from msmodelslim.core.errors import MsModelSlimError, ProcessingError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# A rank waits at a collective while rank 0 writes a block; a big MoE block can take minutes to write.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Collective:
    """This process's place among the ranks, and the merges they share. The default is a single process, for
    which every merge is the identity."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return t
        work = t.detach().to(self.device).reshape(-1).clone()
        dist.all_reduce(work, op=op)
        return work.reshape(t.shape).to(t.device)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MIN)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def sum_int(self, n: int) -> int:
        return int(self.sum(torch.tensor([n], dtype=torch.int64)).item())

    def max_float(self, x: float) -> float:
        return float(self.max(torch.tensor([x], dtype=torch.float64)).item())

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows [n_r, d], concatenated in rank order (so contiguous data shares give the rows in
        the order a single process would have kept them)."""
        if not self.distributed:
            return rows
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=self.device)
        padded[: rows.shape[0]] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(rows.device)


LOCAL = Collective()


def contiguous_share(batches: list[dict[str, torch.Tensor]], rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s contiguous run of batches; each cut lies where the running token count comes closest to
    an equal share."""
    cumulative = [0]
    for b in batches:
        cumulative.append(cumulative[-1] + int(b["input_ids"].numel()))
    bounds = [0]
    for k in range(1, world):
        target = cumulative[-1] * k / world
        bounds.append(min(range(bounds[-1], len(batches) + 1), key=lambda i: abs(cumulative[i] - target)))
    bounds.append(len(batches))
    return batches[bounds[rank] : bounds[rank + 1]]


def rank_device(kind: str, indices: tuple[int, ...], local_rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, indices[local_rank] if indices else local_rank)


def torchrun_world() -> int:
    """WORLD_SIZE when started by torchrun (or any launcher that sets it), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def torchrun_group(kind: str, indices: tuple[int, ...]) -> Iterator[Collective]:
    """This process's rank of a torchrun job, for the duration of the block. The group is destroyed on the way
    out: one left to the interpreter's shutdown can abort the process ("terminate called without an active
    exception") after the work is done."""
    collective = torchrun_rank(kind, indices)
    try:
        yield collective
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_rank(kind: str, indices: tuple[int, ...]) -> Collective:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ProcessingError(f"WORLD_SIZE is set but {', '.join(missing)} are not; start the ranks with torchrun "
                              f"or set all of RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT")
    rank, world, local = int(os.environ["RANK"]), torchrun_world(), int(os.environ["LOCAL_RANK"])
    device = rank_device(kind, indices, local)
    _init_group(kind, device, "env://", rank, world)
    return Collective(rank, world, device)


def _init_group(kind: str, device: torch.device, init_method: str, rank: int, world: int) -> None:
    if kind == "cuda":
        torch.cuda.set_device(device)
    elif kind == "npu":
        import torch_npu  # noqa: F401 - registers the hccl backend and torch.npu

        torch.npu.set_device(device)
    dist.init_process_group(BACKENDS[kind], init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """A rank whose launcher was killed (even by SIGKILL) gets SIGTERM instead of computing for nobody."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux/glibc: the launcher's own cleanup still stops the ranks on Ctrl-C/SIGTERM


def _rank_main(rank: int, world: int, port: int, kind: str, indices: tuple[int, ...], rundir: str,
               work: Callable[..., Any], args: tuple) -> None:
    """Body of one spawned rank: join the group, do the work, leave the result (rank 0) or the error behind."""
    out = Path(rundir)
    _die_with_parent()
    try:
        if kind == "cpu":  # share the cores instead of every rank starting one thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = rank_device(kind, indices, rank)
        _init_group(kind, device, f"tcp://127.0.0.1:{port}", rank, world)
        result = work(Collective(rank, world, device), *args)
        if rank == 0:
            (out / "result.pkl").write_bytes(pickle.dumps(result))
    except MsModelSlimError as exc:
        (out / f"error-{rank}.pkl").write_bytes(pickle.dumps(exc))
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # the first rank to fail is the cause; the others then lose their connection
        (out / f"failure-{rank}.txt").write_text(f"{time.time()!r}\n{type(exc).__name__}: {exc}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(kind: str, indices: tuple[int, ...], rundir: Path, work: Callable[..., Any], *args) -> Any:
    """Run `work(collective, *args)` in one new process per device index and return rank 0's result. If a rank
    fails the others are stopped; a user error (MsModelSlimError) from the lowest failing rank is raised
    again here, anything else becomes a ProcessingError naming the rank (its traceback is on stderr)."""
    import torch.multiprocessing as mp

    world = len(indices)
    context = mp.start_processes(_rank_main, args=(world, _free_port(), kind, indices, str(rundir), work, args),
                                 nprocs=world, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        errors = sorted(rundir.glob("error-*.pkl"))
        if errors:
            raise pickle.loads(errors[0].read_bytes()) from None
        failures = sorted((float(p.read_text().split("\n", 1)[0]), p) for p in rundir.glob("failure-*.txt"))
        if failures:
            first = failures[0][1]
            rank, summary = first.stem.split("-")[1], first.read_text().split("\n", 1)[1]
        else:
            rank, summary = exc.error_index, str(exc).strip().splitlines()[-1]
        raise ProcessingError(f"dp_layer_wise rank {rank} failed first (its traceback is above): {summary}") from None
    except BaseException:  # Ctrl-C or SIGTERM in the launcher: stop the ranks before cleaning up after them
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        raise
    result_file = rundir / "result.pkl"
    if not result_file.is_file():
        raise ProcessingError("dp_layer_wise: rank 0 ended without a result")
    return pickle.loads(result_file.read_bytes())
