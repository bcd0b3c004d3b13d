"""Which finished blocks get a resume checkpoint (core/resume.py CheckpointSchedule, issue #23 and #26 item 5): by
default ("auto") the first, then one once the blocks since the last took 20 times what it cost, and the last."""
import pytest
import torch

from msmodelslim.core import resume
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.resume import AUTO_COST_RATIO, INTERVAL_ENV, BlockCheckpoints, CheckpointSchedule

AUTO = CheckpointSchedule()
EVERY_BLOCK = CheckpointSchedule(0.0, auto=False)
OFF = CheckpointSchedule(None, auto=False)


@pytest.mark.parametrize("raw,want", [(None, AUTO), ("auto", AUTO), (" AUTO ", AUTO), ("0", EVERY_BLOCK),
                                      ("30", CheckpointSchedule(30.0, auto=False)), ("off", OFF)])
def test_the_environment_variable_names_the_schedule(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv(INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(INTERVAL_ENV, raw)
    assert CheckpointSchedule.from_env() == want


@pytest.mark.parametrize("raw", ["-1", "ten", "nan", "30s"])
def test_a_malformed_value_is_refused_with_what_is_accepted(monkeypatch, raw):
    monkeypatch.setenv(INTERVAL_ENV, raw)
    with pytest.raises(ConfigError, match=f"{INTERVAL_ENV}=.*'auto'.*'off'"):
        CheckpointSchedule.from_env()


def test_auto_writes_the_first_then_waits_for_twenty_times_the_last_cost():
    assert AUTO.due(last_block=False, since_last_s=0.001, last_cost_s=None)  # nothing measured yet
    assert not AUTO.due(last_block=False, since_last_s=AUTO_COST_RATIO * 1.5 - 0.01, last_cost_s=1.5)
    assert AUTO.due(last_block=False, since_last_s=AUTO_COST_RATIO * 1.5, last_cost_s=1.5)
    assert AUTO.due(last_block=True, since_last_s=0.0, last_cost_s=100.0)  # the last block's, always


def test_fixed_interval_and_off():
    assert EVERY_BLOCK.due(last_block=False, since_last_s=0.0, last_cost_s=5.0)
    thirty = CheckpointSchedule(30.0, auto=False)
    assert not thirty.due(last_block=False, since_last_s=29.9, last_cost_s=None)
    assert thirty.due(last_block=False, since_last_s=30.0, last_cost_s=None)
    assert thirty.due(last_block=True, since_last_s=0.0, last_cost_s=None)
    assert not OFF.due(last_block=True, since_last_s=1e9, last_cost_s=None) and not OFF.enabled


def _count_by_hand(schedule: CheckpointSchedule, blocks: int, block_s: float, checkpoint_s: float) -> list[int]:
    """The blocks checkpointed, walking a clock block by block (the checkpoint's own time is not 'since')."""
    written, clock, last_end, cost = [], 0.0, 0.0, None
    for index in range(blocks):
        clock += block_s
        if schedule.due(index == blocks - 1, clock - last_end, cost):
            written.append(index)
            clock += checkpoint_s
            last_end, cost = clock, checkpoint_s
    return written


@pytest.mark.parametrize("schedule,blocks,block_s,checkpoint_s,want", [
    # quick blocks beside their checkpoint (SmolLM2's: 2.6 s against 1.2 s): 24 s of blocks between two
    (AUTO, 30, 2.6, 1.2, [0, 10, 20, 29]),
    (AUTO, 30, 1.0, 1.0, [0, 20, 29]),
    (AUTO, 4, 600.0, 10.0, [0, 1, 2, 3]),  # a large model's block computes for minutes: every block
    (EVERY_BLOCK, 5, 0.1, 1.0, [0, 1, 2, 3, 4]),
    (CheckpointSchedule(30.0, auto=False), 10, 10.0, 1.0, [2, 5, 8, 9]),
    (OFF, 10, 10.0, 1.0, []),
])
def test_the_dry_run_counts_what_the_run_writes(schedule, blocks, block_s, checkpoint_s, want):
    assert _count_by_hand(schedule, blocks, block_s, checkpoint_s) == want
    assert schedule.count(blocks, block_s, checkpoint_s) == len(want)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Writer:
    def __init__(self, clock: _Clock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def sync_behind(self):
        def wait() -> None:  # where a real writer's shards are fsynced, on the checkpoint's thread
            self.clock.now += self.seconds
        return wait

    def resume_state(self) -> dict:
        return {}


def test_block_checkpoints_measure_each_write_and_follow_the_schedule(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(resume, "time", clock)
    fingerprint = resume.Fingerprint("c", {}, "d", "code", "runtime")
    checkpoints = BlockCheckpoints(tmp_path, fingerprint, [f"model.layers.{i}" for i in range(10)], AUTO)
    writer = _Writer(clock, seconds=2.0)
    written = []
    for index in range(10):
        clock.now += 7.0  # the block
        if checkpoints.due(index):
            checkpoints.save(index, [torch.full((1, 2, 3), float(index))], 1, writer)
            written.append(index)
        checkpoints.wait()  # as the runner does before the next block: the checkpoint's 2 s block the run
    # 2 s per checkpoint: one once 40 s of blocks passed (7 s each: after 6 blocks), and the last
    assert written == [0, 6, 9]
    assert resume.read_checkpoint(tmp_path, fingerprint, checkpoints.block_names).next_block == 10
