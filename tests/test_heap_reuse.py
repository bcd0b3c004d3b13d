"""core/memory.py heap_reused: a block's repeated temporaries reuse faulted-in heap pages, and
leaving the block puts the 1 MiB mmap bound back and hands the freed pages to the system."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msmodelslim.core import memory
from msmodelslim.core.memory import bound_heap_growth, current_rss, heap_reused

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="the allocator thresholds are glibc's")

MIB = 1 << 20


FAULT_PROBE = """
import resource, sys, torch
from contextlib import nullcontext
from msmodelslim.core.memory import bound_heap_growth, heap_reused
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
x = torch.randn(4096, 256)  # 4 MiB in, 16 MiB hidden: every temporary above the 1 MiB bound
bound_heap_growth()
with (heap_reused() if sys.argv[1] == "reused" else nullcontext()), torch.no_grad():
    for _ in range(4):  # warm-up: the heap settles on the temporaries' sizes
        mlp(x)
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mlp(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[len(faults) // 2])
"""


def faults_of_repeated_forwards(mode: str) -> int:
    """The median minor page faults of one forward of a small MLP, over 8 after a warm-up of 4, in a fresh process
    (this one's heap holds what earlier tests left). The median: now and then one forward's temporary lands in a
    fresh place (16 MiB, 4096 faults) after several quiet ones, when the intra-op threads' timing moves it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", FAULT_PROBE, mode], capture_output=True, text=True, env=env,
                          check=True)
    return int(done.stdout.split()[-1])


def transparent_huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.fixture
def bounded_heap(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert bound_heap_growth()


def test_repeated_forwards_reuse_the_pages_they_faulted_in():
    touched = (16 + 16 + 4) * MIB // 4096  # pages one forward writes
    assert faults_of_repeated_forwards("reused") < touched // 16
    if not transparent_huge_pages_always():  # with 2 MiB pages a fresh mapping costs only a few faults
        assert faults_of_repeated_forwards("bound") > touched // 2  # each temporary a fresh mapping


def test_leaving_the_block_returns_what_it_freed(bounded_heap):
    baseline = current_rss()
    with heap_reused():
        held = [torch.ones(64 * MIB // 4) for _ in range(4)]  # 256 MiB in the heap
        survivor = torch.ones(1024)  # allocated after them and kept: what is alive stays
        del held
        assert current_rss() - baseline > 200 * MIB  # kept while inside: that is the point
    assert current_rss() - baseline < 64 * MIB, (current_rss() - baseline) / MIB
    assert survivor.sum().item() == 1024


def test_thresholds_the_user_set_win(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, *args):
            calls.append(("mallopt", args))
            return 1

        def malloc_trim(self, *args):
            calls.append(("malloc_trim", args))
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc())
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    with heap_reused():
        pass
    assert not bound_heap_growth()
    assert calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    with heap_reused():
        assert calls == [("mallopt", (memory.M_TRIM_THRESHOLD, memory.REUSE_THRESHOLD_BYTES)),
                         ("mallopt", (memory.M_MMAP_THRESHOLD, memory.REUSE_THRESHOLD_BYTES))]
    assert calls[2:] == [("mallopt", (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_BYTES)),
                         ("mallopt", (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD_BYTES)),
                         ("malloc_trim", (0,))]


CAP_PROBE = """
import torch
from msmodelslim.core.memory import bound_heap_growth, current_rss, heap_reused
MIB = 1 << 20
bound_heap_growth()
baseline = current_rss()
# a 1 MiB tensor kept after each piece (too large for the heap's earlier small holes, so it lands right after it):
# a freed heap piece is then a hole, not the heap's top, which the trim threshold would hand back
survivors = []

def pieces(mib, count):
    out = []
    for _ in range(count):
        out.append(torch.ones(mib * MIB // 4))
        survivors.append(torch.ones(MIB // 4))
    return out

with heap_reused():
    big = pieces(16, 8)  # 128 MiB in pieces above the cap
    del big
    after_big = current_rss() - baseline
    small = pieces(4, 32)  # 128 MiB in pieces below it
    del small
    after_small = current_rss() - baseline
print(after_big // MIB, after_small // MIB)
"""


def test_a_cap_sends_larger_temporaries_to_mappings_of_their_own():
    """MSMODELSLIM_HEAP_REUSE_MIB=8: what is above the cap goes back to the system as soon as it is freed, what is
    below stays in the heap until the block ends (in a fresh process: this one's heap holds earlier tests')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env[memory.REUSE_ENV] = "8"
    done = subprocess.run([sys.executable, "-c", CAP_PROBE], capture_output=True, text=True, env=env, check=True)
    after_big, after_small = map(int, done.stdout.split()[-2:])
    assert after_big < 32, after_big  # the 8 survivors and little else
    assert after_small > 128, after_small  # the 40 survivors and the freed small pieces


@pytest.mark.parametrize("raw,expected", [(None, 1 << 30), ("32", 32 * MIB), ("1024", 1 << 30)])
def test_the_cap_is_read_from_the_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(memory.REUSE_ENV, raising=False)
    else:
        monkeypatch.setenv(memory.REUSE_ENV, raw)
    assert memory.reuse_threshold_bytes() == expected


@pytest.mark.parametrize("raw", ["0", "2048", "1.5", "lots"])
def test_a_bad_cap_is_refused_before_any_weight_is_read(monkeypatch, tmp_path, capsys, tiny_llama, raw):
    from msmodelslim.cli.__main__ import main

    monkeypatch.setenv(memory.REUSE_ENV, raw)
    assert main(["quant", "--model_path", str(tiny_llama), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", "Llama-2-7B", "--quant_type", "w8a16", "--allow_default_practice"]) != 0
    assert f"{memory.REUSE_ENV}={raw!r}: expected a whole number of MiB from 1 to 1024" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
