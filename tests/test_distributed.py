"""dp_layer_wise: two gloo ranks on the CPU merge their statistics and write one checkpoint, equal to the
single-process one (byte for byte for min/max and smoothing, within a stated tolerance for GPTQ)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import SCHEMES, quantize_variants
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.device import DeviceSpec, parse_device
from msmodelslim.core.distributed import Collective, contiguous_share, spawn_ranks
from msmodelslim.core.errors import DeviceError, ProcessingError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.processor.linear_quant.processor import InputRecord
from msmodelslim.processor.sampling import RowSample
from msmodelslim.processor.smooth_quant.base import InputStats
from msmodelslim.quantizer.gptaq import accumulate_asymmetry
from msmodelslim.quantizer.gptq import accumulate_hessian
from msmodelslim.quantizer.observer import MinMaxObserver

TWO_CPU_RANKS = DeviceSpec("cpu", (0, 1))


def varied_calib(tmp_path) -> str:
    """Eight samples of four lengths: four batches, so each of two ranks gets real data."""
    path = tmp_path / "varied.jsonl"
    sentence = "Quantization maps floats to integers; apt installs package {i} on Debian. "
    lines = [{"text": sentence.format(i=i) * (1 + i % 4)} for i in range(8)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return str(path)


def quantize_both(model, tmp_path, process, model_type="Llama-2-7B", calib=None):
    """Run once in this process (layer_wise) and once with two CPU ranks; the tensors of both outputs."""
    outs = quantize_variants(model, tmp_path, process, model_type,
                             {"single": ("auto", DeviceSpec("cpu")), "dp": ("auto", TWO_CPU_RANKS)},
                             calib or varied_calib(tmp_path))
    outputs = []
    for out in outs.values():
        tensors = {}
        for shard in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(shard))
        outputs.append((tensors, json.loads((out / "quant_model_description.json").read_text()), out))
    return outputs


def assert_same_model(single_dir, dp_dir) -> None:
    """Dequantized through the reader: every weight within one int4 step on at most 1 % of its elements."""
    single = dict(load_ascendv1(single_dir).state_dict())
    dp = dict(load_ascendv1(dp_dir).state_dict())
    assert single.keys() == dp.keys()
    for name, a in single.items():
        b = dp[name]
        if not a.is_floating_point():
            continue
        differs = ~torch.isclose(a, b, rtol=1e-4, atol=1e-6)
        assert differs.float().mean() <= 0.01, (name, differs.float().mean())


# ---- pieces ---------------------------------------------------------------------------------------------

def test_contiguous_share_covers_every_batch_once_in_order():
    batches = [{"input_ids": torch.full((1, n), i)} for i, n in enumerate([5, 9, 3, 7, 4, 8])]
    for world in (1, 2, 3, 4, 8):
        shares = [contiguous_share(batches, r, world) for r in range(world)]
        flat = [b for share in shares for b in share]
        assert [int(b["input_ids"][0, 0]) for b in flat] == list(range(6))
    two = [sum(b["input_ids"].numel() for b in contiguous_share(batches, r, 2)) for r in range(2)]
    assert abs(two[0] - two[1]) <= 9  # balanced by tokens up to one batch
    # more ranks than batches: some ranks get nothing (and still take part in every merge)
    assert sum(not contiguous_share(batches, r, 8) for r in range(8)) == 2


def test_cpu_ranks_are_parsed_and_bounded():
    assert parse_device("cpu:0,1") == DeviceSpec("cpu", (0, 1))
    assert parse_device("cpu:0") == DeviceSpec("cpu")
    with pytest.raises(DeviceError, match="CPU ranks but only"):
        parse_device("cpu:" + ",".join(str(i) for i in range(4096)))


def _rows(rank: int) -> torch.Tensor:
    torch.manual_seed(rank)
    return torch.randn(5 + 3 * rank, 4)


def _float_rows(rank: int) -> torch.Tensor:
    return 1.1 * _rows(rank) + 0.05


def _merge_worker(collective: Collective) -> dict:
    """Rank r holds _rows(r); rank 1's min/max observer saw nothing. Rank 0 reports what the merges gave."""
    x = _rows(collective.rank)
    observer = MinMaxObserver()
    if collective.rank == 0:
        observer.update(x)
    observer.merge(collective)
    record = InputRecord(collect_hessian=True, sample=RowSample(stride=2), collect_asymmetry=True)
    record.references.append(_float_rows(collective.rank))  # GPTAQ: the float model's input of the same rows
    record.update(x)
    record.merge(collective, 4)
    stats = InputStats(keep_mean=True, keep_samples=True)
    stats.update(x)
    stats.merge(collective, 4)
    return {"min": observer.min, "max": observer.max, "hessian": record.hessian, "tokens": record.tokens,
            "asymmetry": record.asymmetry,
            "sample": record.sample.take(100), "absmax": stats.absmax, "abs_mean": stats.abs_mean,
            "stat_rows": stats.samples(100), "gathered": collective.gather_rows(x), "sum": collective.sum(x.sum(0))}


def test_statistics_merged_by_two_ranks_equal_one_process_over_all_data(tmp_path):
    got = spawn_ranks("cpu", (0, 1), tmp_path, _merge_worker)
    everything = torch.cat([_rows(0), _rows(1)])
    assert torch.equal(got["gathered"], everything)
    assert got["min"] == _rows(0).min() and got["max"] == _rows(0).max()  # the unseen rank changes nothing
    single = InputRecord(collect_hessian=True, sample=RowSample(stride=2))
    single.update(_rows(0))
    single.update(_rows(1))
    assert got["tokens"] == single.tokens == len(everything)
    torch.testing.assert_close(got["hessian"], single.hessian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["hessian"], accumulate_hessian(None, 0, everything)[0], rtol=1e-12, atol=1e-12)
    float_rows = torch.cat([_float_rows(0), _float_rows(1)])
    torch.testing.assert_close(got["asymmetry"], accumulate_asymmetry(None, 0, everything, float_rows), rtol=1e-12,
                               atol=1e-12)
    assert torch.equal(got["sample"], single.sample.take(100))
    assert torch.equal(got["absmax"], everything.abs().amax(0))
    torch.testing.assert_close(got["abs_mean"], everything.abs().mean(0))
    assert torch.equal(got["stat_rows"], torch.cat([_rows(0)[::8], _rows(1)[::8]]))  # every 8th row per batch
    torch.testing.assert_close(got["sum"], everything.sum(0))


def _failing_worker(collective: Collective, kind: str) -> None:
    if collective.rank == 1:
        if kind == "user":
            raise ProcessingError("layer x received no calibration data")
        raise RuntimeError("boom")
    collective.sum_int(1)  # rank 0 waits for rank 1 at a collective, as in a real run


@pytest.mark.parametrize("kind,expected", [("user", "layer x received no calibration data"),
                                           ("bug", "dp_layer_wise rank 1 failed first .*: RuntimeError: boom")])
def test_a_failing_rank_stops_the_run_with_its_message(tmp_path, kind, expected):
    with pytest.raises(ProcessingError, match=expected):
        spawn_ranks("cpu", (0, 1), tmp_path, _failing_worker, kind)


# ---- whole runs -----------------------------------------------------------------------------------------

def test_two_ranks_write_the_single_process_checkpoint_for_minmax_w8a8(tiny_llama, tmp_path):
    """iter_smooth (max statistics) then static W8A8 min/max: every merge is exact, so the bytes are equal."""
    process = [{"type": "iter_smooth", "alpha": 0.9},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}]
    (single, single_desc, single_dir), (dp, dp_desc, dp_dir) = quantize_both(tiny_llama, tmp_path, process)
    assert single.keys() == dp.keys() and single_desc == dp_desc
    for name in single:
        assert torch.equal(single[name], dp[name]), name
    assert any(n.endswith("input_scale") for n in single)
    assert not list(tmp_path.glob(".dp.partial-*"))

    # the same run started by torchrun (the multi-machine launcher) on two local CPU processes
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "msmodelslim", "quant", "--model_path", str(tiny_llama), "--save_path",
                           str(out), "--device", "cpu", "--model_type", "Llama-2-7B", "--config_path",
                           str(tmp_path / "dp.yaml")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp_layer_wise on cpu x 2 ranks" in proc.stderr
    launched = load_file(next(out.glob("*.safetensors")))
    assert launched.keys() == single.keys() and all(torch.equal(launched[k], single[k]) for k in single)


def test_two_ranks_match_one_for_moe_routing(tiny_qwen3_moe, tmp_path):
    """Qwen3-MoE: static W8A8 attention (exact merge) and W4A8 dynamic GPTQ experts, whose Hessians come from
    the tokens the router sent them on each rank; an expert that saw tokens on either rank is not starved."""
    w4_gptq = {**SCHEMES["w4a8_dynamic"], "weight": {**SCHEMES["w4a8_dynamic"]["weight"], "method": "gptq"}}
    process = [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": ["*self_attn*"]},
               {"type": "linear_quant", "qconfig": w4_gptq, "include": ["*mlp.experts*"]}]
    (single, _, _), (dp, _, _) = quantize_both(tiny_qwen3_moe, tmp_path, process, "Qwen3-30B-A3B")
    assert single.keys() == dp.keys()
    for name in single:
        if "self_attn" in name:
            assert torch.equal(single[name], dp[name]), name
    assert_same_model(tmp_path / "single", tmp_path / "dp")


def test_two_ranks_gptq_and_awq_stay_within_tolerance(tiny_qwen2, tmp_path):
    """AWQ (mean |X| and gathered rows) then GPTQ (Hessians summed in another order): not bit-identical, so
    the stated tolerance is: scales within 1e-4 relative, at most 1 % of the int4 codes one step apart."""
    w4 = {"weight": {**SCHEMES["w4a16_g16"]["weight"], "method": "gptq"}}
    process = [{"type": "awq", "weight_qconfig": SCHEMES["w4a16_g16"]["weight"]},
               {"type": "linear_quant", "qconfig": w4, "exclude": ["lm_head"]}]
    (single, _, _), (dp, _, _) = quantize_both(tiny_qwen2, tmp_path, process, "Qwen2.5-7B-Instruct")
    assert single.keys() == dp.keys()
    for name in single:
        a, b = single[name], dp[name]
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        else:  # packed int4 codes: compare bytes
            assert (a != b).float().mean() <= 0.01, name
    assert_same_model(tmp_path / "single", tmp_path / "dp")


def test_histogram_is_refused_under_dp_before_any_rank_starts(tiny_llama, tmp_path):
    histogram = {**SCHEMES["w8a8_static"], "act": {**SCHEMES["w8a8_static"]["act"], "method": "histogram"}}
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "dp_layer_wise", "process": [{"type": "linear_quant", "qconfig": histogram}]}}))
    with pytest.raises(UnsupportedError, match=r"spec.process\[0\] \(linear_quant\) cannot run under dp_layer_wise"):
        quantize(QuantizeRequest(model_path=tiny_llama, save_path=tmp_path / "out", model_type="Llama-2-7B",
                                 device=TWO_CPU_RANKS, config_path=config))
    assert not (tmp_path / "out").exists()


def test_dp_layer_wise_on_one_device_falls_back_with_a_warning(tiny_llama, tmp_path, log_lines):
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "dp_layer_wise", "process": [{"type": "linear_quant", "qconfig": SCHEMES["w8a16"]}]}}))
    quantize(QuantizeRequest(model_path=tiny_llama, save_path=tmp_path / "out", model_type="Llama-2-7B",
                             device=DeviceSpec("cpu"), config_path=config))
    assert any("running layer_wise" in line for line in log_lines)
