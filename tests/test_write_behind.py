"""format/shards.py WriteBehind: shard bytes written on a thread, in order, with bounded memory and errors
raised where the caller can handle them."""
import errno
import io
import threading
import time

import pytest
import torch

from msmodelslim.format.shards import WriteBehind


class SlowFile(io.BytesIO):
    """A file whose writes wait until released, recording the largest number of bytes queued behind them."""

    def __init__(self, writes: WriteBehind) -> None:
        super().__init__()
        self.writes, self.release, self.most_pending = writes, threading.Event(), 0

    def write(self, data) -> int:
        self.release.wait(10)
        self.most_pending = max(self.most_pending, self.writes._pending)
        return super().write(data)


def test_bytes_arrive_in_order():
    writes, file = WriteBehind(limit=1 << 20), io.BytesIO()
    tensors = [torch.arange(n, dtype=torch.int32) * (n + 1) for n in range(1, 200)]
    for tensor in tensors:
        writes.submit(file, tensor)
    writes.drain()
    assert file.getvalue() == b"".join(t.numpy().tobytes() for t in tensors)


def test_at_most_the_limit_waits_unwritten():
    writes = WriteBehind(limit=4096)
    file = SlowFile(writes)
    submitted = []

    def submit_all():
        for _ in range(8):
            writes.submit(file, torch.zeros(1024, dtype=torch.uint8))  # 1 KiB each: 4 fit under the limit
            submitted.append(1)

    thread = threading.Thread(target=submit_all)
    thread.start()
    time.sleep(0.3)
    assert 4 <= len(submitted) <= 5  # the thread holds one, the queue four; the next submit waits
    file.release.set()
    thread.join(10)
    writes.drain()
    assert len(submitted) == 8 and len(file.getvalue()) == 8 * 1024 and file.most_pending <= 4096


def test_a_larger_tensor_than_the_limit_waits_alone():
    writes, file = WriteBehind(limit=100), io.BytesIO()
    writes.submit(file, torch.ones(1000, dtype=torch.uint8))
    writes.submit(file, torch.ones(1000, dtype=torch.uint8))
    writes.drain()
    assert len(file.getvalue()) == 2000


class FullDisk(io.BytesIO):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def write(self, data) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_failed_write_is_raised_in_the_callers_thread_and_stops_the_rest():
    writes, file = WriteBehind(), FullDisk(fail_at=2)
    for value in range(5):
        try:
            writes.submit(file, torch.full((8,), value, dtype=torch.uint8))
        except OSError:
            break  # raised by a submit after the failure: also the caller's thread
    with pytest.raises(OSError) as raised:
        writes.drain()
    assert raised.value.errno == errno.ENOSPC
    assert file.getvalue() == bytes(8)  # the first tensor only: nothing after the failed one
    with pytest.raises(OSError):
        writes.submit(file, torch.zeros(8, dtype=torch.uint8))


def test_the_thread_ends_when_the_queue_runs_empty():
    writes, file = WriteBehind(), io.BytesIO()
    writes.submit(file, torch.zeros(8, dtype=torch.uint8))
    writes.drain()
    deadline = time.monotonic() + 5
    while any(t.name == "msmodelslim-shard-writer" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "msmodelslim-shard-writer" for t in threading.enumerate())
    writes.submit(file, torch.ones(8, dtype=torch.uint8))  # and a new one starts for the next write
    writes.drain()
    assert file.getvalue() == bytes(8) + bytes([1]) * 8


def test_a_barrier_runs_after_the_writes_before_it_and_not_after_later_ones():
    writes = WriteBehind()
    file = SlowFile(writes)
    seen = []
    writes.submit(file, torch.ones(100, dtype=torch.uint8))
    wait = writes.barrier(lambda: seen.append(len(file.getvalue())))
    writes.submit(file, torch.ones(50, dtype=torch.uint8))  # queued behind the barrier
    assert seen == []  # the first write is still held
    file.release.set()
    wait()
    writes.drain()
    assert seen == [100] and len(file.getvalue()) == 150


def test_a_failed_barrier_is_raised_by_its_wait_and_in_the_callers_thread():
    writes, file = WriteBehind(), io.BytesIO()

    def fsync_fails() -> None:
        raise OSError(errno.EIO, "Input/output error")

    wait = writes.barrier(fsync_fails)
    with pytest.raises(OSError) as raised:
        wait()
    assert raised.value.errno == errno.EIO
    with pytest.raises(OSError):
        writes.submit(file, torch.zeros(8, dtype=torch.uint8))
    assert file.getvalue() == b""


def test_a_barrier_after_a_failed_write_does_not_run_and_its_wait_raises_the_write_error():
    writes = WriteBehind()
    file = SlowFile(writes)
    ran = []

    def full_disk(data) -> int:
        file.release.wait(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    file.write = full_disk
    writes.submit(file, torch.zeros(8, dtype=torch.uint8))
    wait = writes.barrier(lambda: ran.append(True))  # queued while the write is held, before it fails
    file.release.set()
    with pytest.raises(OSError) as raised:
        wait()
    assert raised.value.errno == errno.ENOSPC and ran == []
