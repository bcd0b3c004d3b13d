"""Calibration activations spilled to disk (core/activations.py): same values, out of the process's memory,
no files left behind, and a quantization that spills writes the bytes of one that does not."""
from __future__ import annotations

import pytest
import torch

from helpers import STATIC_W8A8_STEP, quantize_variants, shard_bytes
from msmodelslim.core.activations import BUDGET_ENV, DIR_ENV, ActivationSpill, budget_from_env
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.memory import bound_heap_growth


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_spilled_tensor_keeps_its_values_and_leaves_process_memory(tmp_path):
    bound_heap_growth()  # as in a real run: 256 MiB buffers are mmapped and returned when freed
    x = torch.randn(2**26, generator=torch.Generator().manual_seed(0))  # 256 MiB
    holder = (x,)  # e.g. the forward generator's args: it must see the spilled storage too
    probe, total = x[::4099].clone(), x.double().sum()
    spill = ActivationSpill(tmp_path, budget_bytes=0)
    assert spill.engage([x])
    before = rss_mib()
    spill.move_to_disk(x)
    after_spill = rss_mib()
    assert before - after_spill > 200, (before, after_spill)
    assert holder[0] is x and torch.equal(x[::4099], probe) and x.double().sum() == total
    read_back = rss_mib()  # reading faulted the file's pages back in
    spill.evict(x)
    assert read_back - rss_mib() > 200, (read_back, rss_mib())
    assert torch.equal(x[::4099], probe)
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped


def test_under_budget_nothing_moves(tmp_path):
    spill = ActivationSpill(tmp_path, budget_bytes=1 << 30)
    x = torch.ones(1000)
    assert not spill.engage([x])
    address = x.data_ptr()
    spill.move_to_disk(x)
    assert x.data_ptr() == address


def test_evict_ignores_tensors_it_did_not_spill(tmp_path):
    spill = ActivationSpill(tmp_path, budget_bytes=0)
    spill.engage([torch.ones(4)])
    x = torch.arange(1000.0)
    spill.evict(x)  # anonymous memory: must not be touched (MADV_DONTNEED would zero it)
    assert torch.equal(x, torch.arange(1000.0))


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_bad_budget_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(BUDGET_ENV, value)
    with pytest.raises(ConfigError, match=BUDGET_ENV):
        budget_from_env()


def test_bad_spill_directory_fails_before_any_work(monkeypatch, tiny_llama, tmp_path):
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="is not a directory"):
        quantize_variants(tiny_llama, tmp_path, [STATIC_W8A8_STEP], "Llama-2-7B",
                          {"out": ("layer_wise", DeviceSpec("cpu"))})
    assert not (tmp_path / "out").exists()


def test_spilling_changes_no_output_byte(monkeypatch, tiny_qwen2, tmp_path, log_lines):
    """iter_smooth then static W8A8: two forwards per block, both reading spilled inputs."""
    process = [{"type": "iter_smooth", "alpha": 0.5}, STATIC_W8A8_STEP]
    cpu = DeviceSpec("cpu")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    in_memory = quantize_variants(tiny_qwen2, tmp_path / "a", process, "Qwen2-7B", {"memory": ("layer_wise", cpu)})
    monkeypatch.setenv(BUDGET_ENV, "0")
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    spilled = quantize_variants(tiny_qwen2, tmp_path / "b", process, "Qwen2-7B", {"disk": ("layer_wise", cpu)})
    assert any("spilling them to" in line for line in log_lines)
    assert shard_bytes(in_memory["memory"]) == shard_bytes(spilled["disk"])
    assert not list(tmp_path.glob("msmodelslim-act-*"))
