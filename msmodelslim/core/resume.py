"""Resume a killed layer_wise (or model_wise) run from its last checkpointed block (`quant --resume`, issue #23).

After a finished block (which ones: `CheckpointSchedule`) the runner records a checkpoint in the staging directory
(`.resume/` inside it):
- `inputs-NNNNN.safetensors`: the calibration hidden states every live batch feeds block NNNNN (the next one), as
  the previous block's forward produced them: the only state that passes between blocks;
- `state.json`, replaced atomically (write, fsync, rename, fsync the directory) after the inputs and the shard
  bytes it counts are durable: the index of the next block, how many batches are still live (early stopping drops
  batches), the writer's state (shards closed so far, the open shard's length, its description/scheme
  bookkeeping) and the run's fingerprint.
Both are written on a thread of their own while the next block computes (`BlockCheckpoints`).

Nothing else crosses blocks: the processors' cross-block state is rebuilt exactly by a fresh run's planning and
`prepare_model` (quarot's rotation is a function of its seed and the float embeddings; fa3_quant's attention list
comes from the plan), and each processor's statistics are per block. So `--resume` plans and loads as a fresh run
does, fast-forwards every batch's forward generator to the next block with the saved hidden states, restores the
writer (cutting off what the killed run appended after the checkpoint) and goes on: the output is byte-identical to
an uninterrupted run and no checkpointed block is computed or written again (the blocks the killed run finished
after its last checkpoint are).

The fingerprint covers what decides the bytes: the normalized config and the model type, the model files (content of the small ones:
config, tokenizer, index; name, size and mtime of the weights), the calibration data (the texts; a VLM run's prompts
and the content of its image files), msmodelslim's source files, and the runtime (torch/transformers versions,
runner, device). A checkpoint whose fingerprint differs is refused, naming the parts that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.faults import fault_point
from msmodelslim.core.logging import get_logger
from msmodelslim.core.vlm_dataset import CalibrationData, calibration_digest
from msmodelslim.format.shards import fsync_path
from msmodelslim.format.staging import RESUME_STATE

log = get_logger("resume")

FORMAT_VERSION = 1
START_OVER = "rerun without --resume to start over"
SMALL_FILE_BYTES = 16 << 20  # model files up to this size are hashed by content (config, tokenizer, index)
INTERVAL_ENV = "MSMODELSLIM_CHECKPOINT_SECONDS"  # "auto", least seconds between two checkpoints, or "off"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---- fingerprint ---------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_files(model_path: Path) -> dict[str, str]:
    """{file name: content hash (small files) or size and mtime (weights)} of the model directory, recursively."""
    files = {}
    for path in sorted(p for p in model_path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        stat = path.stat()
        name = str(path.relative_to(model_path))
        files[name] = (_sha256(path.read_bytes()) if stat.st_size <= SMALL_FILE_BYTES
                       else f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}")
    return files


def _code_hash() -> str:
    """msmodelslim's own source and data files: a changed line may change the bytes it writes."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".ini", ".yaml", ".json", ".txt"):
            digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _runtime(runner: str, device: str) -> str:
    import transformers

    return (f"runner {runner} on {device}, python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


@dataclass(frozen=True)
class Fingerprint:
    config: str
    model_files: dict[str, str]
    data: str
    code: str
    runtime: str

    @classmethod
    def of_run(cls, config: dict, model_type: str, model_path: Path, calibration: CalibrationData, runner: str,
               device: str) -> "Fingerprint":
        """`config`: the practice as the saved `*_best_practice.yaml` holds it (normalized by pydantic)."""
        chosen = {"practice": config, "model_type": model_type}
        return cls(_sha256(json.dumps(chosen, sort_keys=True).encode()), _model_files(model_path),
                   calibration_digest(calibration), _code_hash(), _runtime(runner, device))

    def to_json(self) -> dict:
        return {"config": self.config, "model_files": self.model_files, "data": self.data, "code": self.code,
                "runtime": self.runtime}

    def differences(self, recorded: dict) -> list[str]:
        """What differs between this run and the one that wrote `recorded`, one phrase per part."""
        out = []
        if recorded.get("config") != self.config:
            out.append("the config (spec and metadata, after defaults are filled in) or --model_type")
        before = recorded.get("model_files") or {}
        changed = sorted(n for n in set(before) | set(self.model_files) if before.get(n) != self.model_files.get(n))
        if changed:
            out.append(f"the model files ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''})")
        if recorded.get("data") != self.data:
            out.append("the calibration data")
        if recorded.get("code") != self.code:
            out.append("msmodelslim's code (another version or edited source)")
        if recorded.get("runtime") != self.runtime:
            out.append(f"the runtime (was: {recorded.get('runtime')}; now: {self.runtime})")
        return out


# ---- reading a checkpoint ------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where a killed run stopped: everything the runner needs to go on with block `next_block`."""

    staging: Path
    next_block: int
    live_batches: int
    inputs: Optional[Path]  # the hidden states block `next_block` receives (None: no calibration, or no next block)
    writer_state: dict

    def load_hidden_states(self, device: torch.device, with_reference: bool = False
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Block `next_block`'s inputs per live batch and, `with_reference`, the float model's (GPTAQ,
        core/reference.py), from one read of the checkpoint."""
        if self.inputs is None:
            return [], []
        tensors = load_file(self.inputs)
        inputs = [tensors[f"batch{i}"].to(device) for i in range(self.live_batches)]
        if not with_reference:
            return inputs, []
        if any(f"reference{i}" not in tensors for i in range(self.live_batches)):
            raise ConfigError(f"--resume: the checkpoint {self.inputs} holds no float-model hidden states, which "
                              f"this run's GPTAQ needs; {START_OVER}")
        return inputs, [tensors[f"reference{i}"].to(device) for i in range(self.live_batches)]


def read_checkpoint(staging: Path, fingerprint: Fingerprint, block_names: list[str]) -> ResumePoint:
    """The checkpoint of `staging`, checked against this run; a ConfigError says why it cannot be continued."""
    try:
        state = json.loads((staging / RESUME_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: the checkpoint {staging / RESUME_STATE} is unreadable ({exc}); {START_OVER}"
                          ) from None
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--resume: the checkpoint in {staging} was written in checkpoint format "
                          f"{state.get('format')}, this version reads {FORMAT_VERSION}; {START_OVER}")
    differences = fingerprint.differences(state.get("fingerprint", {}))
    if not differences and state.get("block_names") != block_names:
        differences = ["the model's blocks"]
    if differences:
        raise ConfigError(f"--resume refused: the interrupted run in {staging} differs from this one in "
                          f"{'; '.join(differences)}. Its finished blocks are not what this run would compute, so "
                          f"nothing was changed; {START_OVER} (that removes it)")
    inputs = state["inputs"]
    return ResumePoint(staging, state["next_block"], state["live_batches"],
                       staging / RESUME_STATE.parent / inputs if inputs else None, state["writer"])


def describe(point: ResumePoint, total_blocks: int) -> str:
    return f"{point.next_block} of {total_blocks} blocks finished"


# ---- writing checkpoints -------------------------------------------------------------------------------------
AUTO_COST_RATIO = 20.0  # "auto": blocks worth 20x a checkpoint's cost between two, so they take <= ~5 % of a run


@dataclass(frozen=True)
class CheckpointSchedule:
    """Which finished blocks get a checkpoint, from `MSMODELSLIM_CHECKPOINT_SECONDS`:
    - "auto" (the default): the first block's, then one once the blocks since the last checkpoint took at least
      `AUTO_COST_RATIO` times what that checkpoint cost the run (the time it blocked it: checkpoints are written
      behind the next block, `BlockCheckpoints`). Checkpoints then cost about 1/20 of the run at most, whatever
      the model, and a kill loses at most about 20 checkpoints' cost of work (or one block, where a block takes
      longer): where a checkpoint is written within the next block's time (a large model's block computes for
      minutes; SmolLM2's 151 MB take less than its 1–3 s blocks) that is one after every block, and one every
      few blocks only where blocks are quick beside the write of their activations;
    - S >= 0 seconds: one once S seconds passed since the last (0: after every block);
    - "off": none (a killed run cannot be resumed).
    The last block's is always written: it spares a resume every block if saving dies."""

    least_seconds: Optional[float] = None  # fixed interval; None with auto False: never
    auto: bool = True

    @classmethod
    def from_env(cls) -> "CheckpointSchedule":
        raw = os.environ.get(INTERVAL_ENV, "auto").strip().lower()
        if raw in ("auto", ""):
            return cls()
        if raw == "off":
            return cls(None, auto=False)
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected 'auto' (the default: checkpoints take about 1/"
                              f"{AUTO_COST_RATIO:g} of the run), a number of seconds >= 0 (the least time between two "
                              f"checkpoints; 0: after every block) or 'off' (no checkpoints: a killed run cannot be "
                              f"resumed)")
        return cls(seconds, auto=False)

    @property
    def enabled(self) -> bool:
        return self.auto or self.least_seconds is not None

    def due(self, last_block: bool, since_last_s: float, last_cost_s: Optional[float]) -> bool:
        """`since_last_s`: seconds since the last checkpoint ended (or the blocks began); `last_cost_s`: what the
        last checkpoint took (None: none written yet)."""
        if not self.enabled:
            return False
        if last_block:
            return True
        if self.auto:
            return last_cost_s is None or since_last_s >= AUTO_COST_RATIO * last_cost_s
        return since_last_s >= self.least_seconds

    def count(self, blocks: int, block_s: float, checkpoint_s: float) -> int:
        """How many checkpoints a run of `blocks` blocks, each taking `block_s` and each checkpoint `checkpoint_s`,
        writes (the dry run's estimate)."""
        written, since, cost = 0, 0.0, None
        for index in range(blocks):
            since += block_s
            if self.due(index + 1 == blocks, since, cost):
                written, since, cost = written + 1, 0.0, checkpoint_s
        return written

    def describe(self) -> str:
        if self.auto:
            return (f"{INTERVAL_ENV}=auto: after the first block, then once the blocks since the last took "
                    f"{AUTO_COST_RATIO:g}x its cost, and after the last")
        if self.least_seconds is None:
            return f"{INTERVAL_ENV}=off: none"
        if self.least_seconds == 0:
            return f"{INTERVAL_ENV}=0: after every block"
        return f"{INTERVAL_ENV}={self.least_seconds:g}: at most one per {self.least_seconds:g} s, and after the last"


class BlockCheckpoints:
    """Writes the checkpoint after a finished block, when its `CheckpointSchedule` says so, behind the next block:
    `save` takes a snapshot (the hidden states, which the next block only reads, and the writer's state) and a
    thread of its own writes it, fsyncs it and names it in `state.json` once the shards it counts are durable
    too, while the run computes on. One is written at a time; `wait()` returns once it is recorded (raising its
    error), and the runner calls it before the hidden states it holds would be freed, so a checkpoint never
    keeps more memory alive than the run does. What a checkpoint costs the run is the time `save` and `wait`
    block it: the schedule's "auto" spaces checkpoints by that."""

    def __init__(self, staging: Path, fingerprint: Fingerprint, block_names: list[str],
                 schedule: CheckpointSchedule = CheckpointSchedule(0.0, auto=False)) -> None:
        self.directory = staging / RESUME_STATE.parent
        self.fingerprint = fingerprint
        self.block_names = block_names
        self.schedule = schedule
        self._last = time.monotonic()
        self._last_cost: Optional[float] = None
        self._writing: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @classmethod
    def from_env(cls, staging: Path, fingerprint: Fingerprint, block_names: list[str]) -> "BlockCheckpoints":
        return cls(staging, fingerprint, block_names, CheckpointSchedule.from_env())

    def due(self, index: int) -> bool:
        return self.schedule.due(index + 1 == len(self.block_names), time.monotonic() - self._last, self._last_cost)

    def save(self, index: int, next_inputs: list[torch.Tensor], live_batches: int, writer,
             reference: Optional[list[torch.Tensor]] = None) -> None:
        """Block `index` is finished and handed to `writer`: record it. `next_inputs`: block index+1's hidden
        states per live batch (empty after the last block or without calibration), not changed afterwards;
        `reference`: the float model's ones (GPTAQ), saved beside them."""
        begun = time.monotonic()
        self.wait()
        self.directory.mkdir(exist_ok=True)
        inputs = f"inputs-{index + 1:05d}.safetensors" if next_inputs else None
        tensors = {f"batch{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(next_inputs)}
        tensors.update({f"reference{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(reference or [])})
        shards_durable = writer.sync_behind()
        state = json.dumps({"format": FORMAT_VERSION, "next_block": index + 1, "live_batches": live_batches,
                            "inputs": inputs, "block_names": self.block_names,
                            "fingerprint": self.fingerprint.to_json(), "writer": writer.resume_state()})
        self._writing = threading.Thread(target=self._record, args=(index, tensors, inputs, state, shards_durable),
                                         name="msmodelslim-checkpoint")
        self._writing.start()
        self._last = time.monotonic()
        self._last_cost = self._last - begun
        log.debug("checkpoint after block %d: %.3f s before it was handed to its thread", index, self._last_cost)

    def wait(self) -> None:
        """Return once the checkpoint being written is recorded; its error (a full disk) is raised here."""
        if self._writing is None:
            return
        begun = time.monotonic()
        self._writing.join()
        self._writing = None
        waited = time.monotonic() - begun
        self._last_cost = (self._last_cost or 0.0) + waited
        if waited > 0.01:
            log.debug("waited %.3f s for a checkpoint's thread", waited)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _record(self, index: int, tensors: dict, inputs: Optional[str], state: str, shards_durable) -> None:
        try:
            if inputs is not None:
                save_file(tensors, self.directory / inputs)
                fsync_path(self.directory / inputs)
            shards_durable()  # the state names the shards' bytes: they reach the disk first
            tmp = self.directory / (RESUME_STATE.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as file:
                file.write(state)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.directory / RESUME_STATE.name)
            fsync_path(self.directory)
            for stale in self.directory.glob("inputs-*.safetensors"):  # the previous block's, no longer named
                if stale.name != inputs:
                    stale.unlink()
        except BaseException as exc:  # raised in the run's thread by wait()
            self._error = exc
            return
        fault_point(f"checkpoint:{index}")

    def discard_later_work(self, staging: Path, point: ResumePoint, subfolders: Sequence[Path] = ()) -> None:
        """Before continuing in a killed run's staging directory: remove whatever it wrote after its checkpoint
        except the shards (the writer's `restore_state` cuts those back) and the checkpoint itself. `subfolders`:
        the formats' own directories when one run writes several (app/quantize.py), cleaned the same way."""
        for directory in (staging, *subfolders):
            for entry in directory.iterdir():
                if (entry.name.startswith((".shard-", ".msmodelslim")) or entry.name == RESUME_STATE.parts[0]
                        or entry in subfolders):
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in self.directory.iterdir():
            if entry.name != RESUME_STATE.name and (point.inputs is None or entry.name != point.inputs.name):
                entry.unlink()

    def settle(self) -> None:
        """Let the checkpoint being written end (after an error, before the staging directory may go); its own
        error, if any, is dropped: the run's is the one to report."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        self._error = None

    def remove(self) -> None:
        """The output is complete: the checkpoint is not part of it. The state goes first: the shards are already
        renamed, so a kill inside the removal must not leave a state whose rename journal is already gone (a
        resume would then find its shards missing); without the state the directory is no checkpoint."""
        self.settle()
        (self.directory / RESUME_STATE.name).unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)
