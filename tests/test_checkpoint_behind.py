"""core/resume.py BlockCheckpoints writes each checkpoint behind the next block (issue #23, #26 item 5): what it
records is the snapshot taken when the block finished, it is named in state.json only once the shards it counts
are durable, and a failure on its thread is raised in the run's thread."""
import errno
import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import SCHEMES, run_quant, small_calib, write_config
from msmodelslim.core import resume
from msmodelslim.core.resume import INTERVAL_ENV, BlockCheckpoints, read_checkpoint
from msmodelslim.core.walk import BatchWalks
from msmodelslim.format.shards import ShardStream
from msmodelslim.format.staging import RESUME_STATE

BLOCKS = [f"model.layers.{i}" for i in range(3)]
FINGERPRINT = resume.Fingerprint("c", {}, "d", "code", "runtime")


class HeldWriter:
    """A writer whose shards become durable only when the test says so."""

    def __init__(self, fail: bool = False) -> None:
        self.durable, self.fail = threading.Event(), fail
        self.state = {"names": ["a"]}

    def sync_behind(self):
        def wait() -> None:
            assert self.durable.wait(10)
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
        return wait

    def resume_state(self) -> dict:
        return self.state


def test_the_state_is_named_after_the_shards_are_durable_and_is_the_snapshot_of_the_finished_block(tmp_path):
    checkpoints = BlockCheckpoints(tmp_path, FINGERPRINT, BLOCKS)
    writer = HeldWriter()
    hidden = torch.randn(2, 5, 8)
    checkpoints.save(0, [hidden], 1, writer)
    writer.state["names"].append("b")  # the run goes on handing the writer the next block
    assert not (tmp_path / RESUME_STATE).exists()
    writer.durable.set()
    checkpoints.wait()
    point = read_checkpoint(tmp_path, FINGERPRINT, BLOCKS)
    assert point.next_block == 1 and point.writer_state == {"names": ["a"]}
    inputs, _ = point.load_hidden_states(torch.device("cpu"))
    assert torch.equal(inputs[0], hidden)


def test_a_failure_behind_the_run_is_raised_by_wait_and_names_nothing(tmp_path):
    checkpoints = BlockCheckpoints(tmp_path, FINGERPRINT, BLOCKS)
    writer = HeldWriter(fail=True)
    checkpoints.save(0, [torch.zeros(1, 2, 8)], 1, writer)
    writer.durable.set()
    with pytest.raises(OSError) as raised:
        checkpoints.wait()
    assert raised.value.errno == errno.ENOSPC
    assert not (tmp_path / RESUME_STATE).exists()
    checkpoints.wait()  # raised once


class ShardWriter:
    def __init__(self, directory) -> None:
        self.shards = ShardStream(directory, 0)

    def sync_behind(self):
        return self.shards.sync_behind()

    def resume_state(self) -> dict:
        return {"shards": self.shards.state()}


def test_a_real_shard_stream_is_recorded_at_the_block_and_cut_back_there(tmp_path):
    writer = ShardWriter(tmp_path)
    checkpoints = BlockCheckpoints(tmp_path, FINGERPRINT, BLOCKS)
    first = torch.arange(1000, dtype=torch.float32)
    writer.shards.add("model.layers.0.w", first)
    checkpoints.save(0, [], 0, writer)
    writer.shards.add("model.layers.1.w", torch.ones(5000))  # appended while the checkpoint is written
    checkpoints.wait()
    state = json.loads((tmp_path / RESUME_STATE).read_text())["writer"]["shards"]
    assert state["names"] == ["model.layers.0.w"] and state["open"]["offset"] == first.numel() * 4
    writer.shards.sync()
    writer.shards._open.file.close()  # the killed run's handle
    again = ShardStream(tmp_path, 0)
    again.restore(state)  # what --resume does: the later block's bytes are cut off
    assert again.names == ["model.layers.0.w"]
    again.add("model.layers.1.w", torch.full((3,), 2.0))
    again.finish(lambda i, n: "out.safetensors", None)
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["model.layers.0.w"], first) and torch.equal(loaded["model.layers.1.w"], torch.full((3,), 2.0))


def test_a_run_does_not_free_the_hidden_states_a_checkpoint_is_still_writing(tiny_llama, tmp_path, monkeypatch):
    """The runner waits for the checkpoint written behind a block before the next block's outputs replace the
    hidden states it saves: with a slow disk (each checkpoint 0.2 s, a tiny block far less) checkpoint i is recorded
    before the walks advance past block i + 1, so a checkpoint never holds memory the run would have freed."""
    monkeypatch.setenv(INTERVAL_ENV, "0")
    events = []
    record, advance = BlockCheckpoints._record, BatchWalks.advance

    def slow_record(self, index, *args):
        time.sleep(0.2)
        record(self, index, *args)
        events.append(("recorded", index))

    def logged_advance(self, outputs):
        events.append(("advance", None))
        advance(self, outputs)

    monkeypatch.setattr(BlockCheckpoints, "_record", slow_record)
    monkeypatch.setattr(BatchWalks, "advance", logged_advance)
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
    run_quant(tiny_llama, tmp_path / "out", config)
    advances = [i for i, (kind, _) in enumerate(events) if kind == "advance"]
    recorded = {index: i for i, (kind, index) in enumerate(events) if kind == "recorded"}
    assert len(advances) >= 2 and sorted(recorded) == list(range(len(advances)))
    for index, position in recorded.items():
        if index + 1 < len(advances):
            assert position < advances[index + 1], events


def test_removing_the_checkpoint_drops_its_state_before_the_rename_journal(tmp_path, monkeypatch):
    """After a finished run has renamed its shards, a kill inside the checkpoint's removal must not leave a state
    whose rename journal is gone (a resume would find the shards missing): the state goes first."""
    from msmodelslim.core import resume as resume_module
    from msmodelslim.format.shards import RENAMES
    from msmodelslim.format.staging import RESUME_STATE

    checkpoints = BlockCheckpoints(tmp_path, FINGERPRINT, BLOCKS)
    checkpoints.directory.mkdir(parents=True, exist_ok=True)
    (tmp_path / RESUME_STATE).write_text("{}")
    (tmp_path / RENAMES).write_text("[]")
    seen = []

    def killed_inside_rmtree(path, ignore_errors=False):  # the kill lands before rmtree removes anything
        seen.append(((tmp_path / RESUME_STATE).exists(), (tmp_path / RENAMES).exists()))

    monkeypatch.setattr(resume_module.shutil, "rmtree", killed_inside_rmtree)
    checkpoints.remove()
    assert seen == [(False, True)]
