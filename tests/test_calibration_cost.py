"""Calibration costs what its statistics need (issue #26): static min/max ranges after smoothing come from the
smoothing forward's per-channel ranges (one forward per block instead of two, same result up to float rounding),
a real forward where that is not exact, and early stopping once the ranges converge."""
import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from helpers import SCHEMES, run_quant, write_pipeline, saved_tensors
from msmodelslim.core import runner
from msmodelslim.core.calibration import BlockInputRanges, ChannelRange, Convergence, EarlyStop, relative_change
from msmodelslim.core.config import CalibrationConfig
from msmodelslim.processor.group.processor import GroupProcessor
from msmodelslim.processor.linear_quant.processor import LinearQuantProcessor
from tiny_models import make_tiny_model

STATIC = SCHEMES["w8a8_static"]
DYNAMIC = SCHEMES["w8a8_dynamic"]
SMOOTHERS = {
    "smooth_quant": {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
    "iter_smooth": {"type": "iter_smooth"},
    "flex_smooth_quant": {"type": "flex_smooth_quant"},  # scored with the schemes the later steps give
}
STATIC_ALL = {"type": "linear_quant", "qconfig": STATIC, "exclude": ["lm_head"]}
STATIC_SPLIT = {"type": "group", "configs": [
    {"type": "linear_quant", "qconfig": STATIC, "exclude": ["lm_head", "*down_proj"]},
    {"type": "linear_quant", "qconfig": DYNAMIC, "include": ["*down_proj"]}]}


# ---- pure pieces ------------------------------------------------------------------------------------------------
def test_divided_ranges_equal_the_ranges_of_the_divided_input():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16) * torch.linspace(0.1, 30, 16)
    s = torch.rand(16) * 5 + 0.05
    r = ChannelRange.empty(16)
    r.update(x[:2])
    r.update(x[2:])
    reference = (x / s).reshape(-1, 16)
    derived = r.divided(s)
    assert torch.allclose(derived.min, reference.amin(0), rtol=1e-6, atol=0)
    assert torch.allclose(derived.max, reference.amax(0), rtol=1e-6, atol=0)
    lo, hi = derived.tensor_range()
    assert torch.isclose(lo, reference.min(), rtol=1e-6) and torch.isclose(hi, reference.max(), rtol=1e-6)


def test_recorded_ranges_are_those_of_every_linear_input_and_follow_declared_scalings():
    torch.manual_seed(1)
    block = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(10, 4)
    ranges = BlockInputRanges.record(block)
    block(x)
    ranges.stop()
    hidden = block[1](block[0](x))
    assert torch.equal(ranges["0"].min, x.amin(0)) and torch.equal(ranges["2"].max, hidden.amax(0))
    s = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.0, 8.0])
    scaled = ranges.scaled({"2": s})
    assert torch.equal(scaled["0"].max, ranges["0"].max)  # not named: unchanged
    assert torch.allclose(scaled["2"].max, hidden.amax(0) / s)
    assert ranges.scaled(None) is None  # an undeclared change drops the ranges


def test_relative_change_is_measured_against_the_linears_largest_channel():
    before = {"a": ChannelRange(torch.tensor([-1.0, -100.0]), torch.tensor([1.0, 100.0])),
              "b": ChannelRange(torch.tensor([-2.0]), torch.tensor([2.0]))}
    now = {"a": ChannelRange(torch.tensor([-1.0, -100.0]), torch.tensor([3.0, 101.0])),
           "b": ChannelRange(torch.tensor([-2.1]), torch.tensor([2.0]))}
    # a: the small channel moved by 2, the large one by 1; both against a's largest magnitude 101 -> 2/101.
    # b: 0.1 against 2.1. The worst linear decides.
    assert relative_change(before, now) == pytest.approx(0.1 / 2.1)
    del now["b"], before["b"]
    assert relative_change(before, now) == pytest.approx(2 / 101)
    unseen = {"a": ChannelRange(torch.tensor([float("inf"), -1.0]), torch.tensor([float("-inf"), 1.0]))}
    assert relative_change(unseen, before) == 1.0  # a channel seen for the first time is a change


def slow_stop_point(batches: list[torch.Tensor], rule: EarlyStop) -> int:
    """Scalar reference: the first batch count n whose token total T_n >= min_tokens at which every channel's
    running min and max moved by at most rtol x the current max|x| over all channels since the latest batch
    count m with T_m <= T_n - window_tokens; len(batches) when none."""
    totals = [sum(len(b) for b in batches[:n]) for n in range(len(batches) + 1)]

    def running(n):
        seen = torch.cat(batches[:n])
        return seen.amin(0), seen.amax(0)

    for n in range(1, len(batches) + 1):
        old = [m for m in range(1, n) if totals[m] <= totals[n] - rule.window_tokens]
        if totals[n] < rule.min_tokens or not old:
            continue
        (lo0, hi0), (lo1, hi1) = running(old[-1]), running(n)
        largest = max(max(abs(float(lo1[j])), abs(float(hi1[j]))) for j in range(lo1.numel()))
        ok = True
        for j in range(lo1.numel()):
            change = max(abs(float(lo1[j] - lo0[j])), abs(float(hi1[j] - hi0[j])))
            ok &= largest == 0 or change / largest <= rule.rtol
        if ok:
            return n
    return len(batches)


@pytest.mark.parametrize("rule", [EarlyStop(rtol=0.02, window_tokens=50, min_tokens=80), EarlyStop(0.1, 1, 2),
                                  EarlyStop(0.2, 200, 100), EarlyStop(0.1, 100, 300), EarlyStop(0.05, 200, 100)])
def test_convergence_stops_where_the_scalar_reference_does(rule):
    torch.manual_seed(2)
    # heavy tails: the running extremes keep moving for a while, then settle; batches of 1 to 30 rows
    sizes = torch.randint(1, 31, (60,)).tolist()
    batches = [torch.distributions.StudentT(3.0).sample((rows, 5)) * torch.tensor([1, 2, 5, 10, 0.1])
               for rows in sizes]
    block = nn.Linear(5, 2)
    ranges = BlockInputRanges.record(block)
    convergence = Convergence(rule, ranges)
    stopped = len(batches)
    for n, x in enumerate(batches, start=1):
        block(x)
        if convergence.after_batch(len(x)):
            stopped = n
            break
    ranges.stop()
    reference = slow_stop_point(batches, rule)
    assert stopped == reference
    assert 1 < reference < len(batches) or rule == EarlyStop(0.05, 200, 100)  # that one never converges here


def test_calibration_config_defaults_and_off_switch():
    assert CalibrationConfig().early_stop_rule() == EarlyStop()
    assert CalibrationConfig(early_stop=False).early_stop_rule() is None


# ---- one forward instead of two -----------------------------------------------------------------------------------
def many_calib(tmp_path, count=12) -> str:
    """`count` texts of growing length: one batch each (batches group equal lengths), in text order."""
    path = tmp_path / f"calib{count}.jsonl"
    texts = [f"Sample {i}: " + "word " * i + f"quantization maps floats to int8, apt installs package {i * 7}."
             for i in range(count)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return str(path)


def write(path, process, dataset, calibration=None):
    return write_pipeline(path, process, dataset, calibration=calibration or {"early_stop": False})


@pytest.fixture
def count_forwards(monkeypatch):
    calls = []
    real = runner._forward_all

    def counted(block_name, requests, *args, **kwargs):
        calls.append(block_name)
        return real(block_name, requests, *args, **kwargs)

    monkeypatch.setattr(runner, "_forward_all", counted)
    return calls


def forced_second_forward(monkeypatch):
    """The path before issue #26: every calibrating step gets its own forward."""
    monkeypatch.setattr(LinearQuantProcessor, "ranges_suffice", lambda *a: False)
    monkeypatch.setattr(GroupProcessor, "ranges_suffice", lambda *a: False)


def assert_same_up_to_float_rounding(one: dict, two: dict):
    """Ranges (input_scale) and dequantization scales equal to float rounding; integers (codes, input offsets)
    differ only where float rounding puts a value on the other side of a rounding boundary. quant_bias is derived
    from codes and offset (one flipped code moves it by the offset), so it is covered by those."""
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        if name.endswith("quant_bias"):
            continue
        if name.endswith("deq_scale"):  # float32 bit patterns stored as int64 (docs/ascendv1.md)
            a, b = a.to(torch.int32).view(torch.float32), b.to(torch.int32).view(torch.float32)
        if a.dtype.is_floating_point and not name.endswith("input_offset"):
            assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7), name
        else:
            diff = (a.double() - b.double()).abs()
            assert float(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, diff.numel() // 1000), name


@pytest.mark.parametrize("smoother", list(SMOOTHERS))
@pytest.mark.parametrize("quant", ["static", "static_split"])
def test_one_forward_gives_the_ranges_of_two(tmp_path, monkeypatch, count_forwards, smoother, quant):
    source = make_tiny_model(tmp_path / "src", "qwen2", seed=3)
    blocks = 2
    process = [SMOOTHERS[smoother], STATIC_ALL if quant == "static" else STATIC_SPLIT]
    # float32 forwards: the two paths then differ by float32 rounding only (bfloat16 would round them apart)
    config = write(tmp_path / "c.yaml", process, many_calib(tmp_path, 6), {"early_stop": False, "precision": "float32"})
    run_quant(source, tmp_path / "one", config, "Qwen2-7B")
    assert len(count_forwards) == blocks  # the smoothing forward serves the static ranges
    count_forwards.clear()
    forced_second_forward(monkeypatch)
    run_quant(source, tmp_path / "two", config, "Qwen2-7B")
    assert len(count_forwards) == 2 * blocks
    one, two = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert any(n.endswith("input_scale") for n in one)
    assert_same_up_to_float_rounding(one, two)


def test_ranges_carried_through_no_change_are_bit_identical(tmp_path, monkeypatch, count_forwards):
    """A smoothing step that selects nothing changes nothing ({} scaling): the carried ranges are the very ones a
    second forward of the unchanged block would record, so the output is byte-identical."""
    source = make_tiny_model(tmp_path / "src", "llama", seed=5)
    process = [{**SMOOTHERS["smooth_quant"], "include": ["no.such.layer"]}, STATIC_ALL]
    config = write(tmp_path / "c.yaml", process, many_calib(tmp_path, 4))
    run_quant(source, tmp_path / "one", config)
    assert len(count_forwards) == 2
    forced_second_forward(monkeypatch)
    run_quant(source, tmp_path / "two", config)
    assert len(count_forwards) == 2 + 4
    one, two = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("case", ["histogram", "gptq", "dynamic_o_between"])
def test_falls_back_to_a_real_forward_where_ranges_are_not_exact(tmp_path, count_forwards, case):
    source = make_tiny_model(tmp_path / "src", "qwen2", seed=3)
    smoothing = SMOOTHERS["smooth_quant"]
    if case == "histogram":
        process = [smoothing, {"type": "linear_quant", "exclude": ["lm_head"],
                               "qconfig": {**STATIC, "act": {**STATIC["act"], "method": "histogram"}}}]
    elif case == "gptq":
        process = [smoothing, {"type": "linear_quant", "exclude": ["lm_head"],
                               "qconfig": {**STATIC, "weight": {**STATIC["weight"], "method": "gptq"}}}]
    else:  # quantized o_proj changes the MLP's inputs (through the residual) before the static step
        process = [smoothing, {"type": "linear_quant", "qconfig": DYNAMIC, "include": ["*o_proj"]},
                   {"type": "linear_quant", "qconfig": STATIC, "exclude": ["lm_head", "*o_proj"]}]
    run_quant(source, tmp_path / "out", write(tmp_path / "c.yaml", process, many_calib(tmp_path, 3)), "Qwen2-7B")
    assert len(count_forwards) == 2 * 2


# ---- early stopping -----------------------------------------------------------------------------------------------
def test_early_stop_uses_a_prefix_of_the_batches_for_every_block(tmp_path, caplog):
    """rtol 2 always passes (a running extreme moves by at most 2x the channel's magnitude), so every block stops
    once it has seen min_tokens (here: the first four batches): byte-identical to a run on those four."""
    source = make_tiny_model(tmp_path / "src", "llama", seed=5)
    process = [SMOOTHERS["smooth_quant"], STATIC_ALL]
    full = many_calib(tmp_path, 10)
    tokenizer = AutoTokenizer.from_pretrained(source)
    first_four = sum(len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in open(full).readlines()[:4])
    rule = {"early_stop": True, "rtol": 2.0, "window_tokens": 1, "min_tokens": first_four}
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        run_quant(source, tmp_path / "early", write(tmp_path / "e.yaml", process, full, rule))
    assert "calibration stopped after 4 of 10 batches" in caplog.text
    assert "last block was calibrated on 4 of the 10 batches" in caplog.text
    prefix = tmp_path / "prefix.jsonl"  # batches are ordered by token length: here, by text order
    prefix.write_text("\n".join(open(full).read().splitlines()[:4]))
    run_quant(source, tmp_path / "prefix", write(tmp_path / "p.yaml", process, str(prefix)))
    early, reference = saved_tensors(tmp_path / "early"), saved_tensors(tmp_path / "prefix")
    assert early.keys() == reference.keys()
    for name in early:
        assert torch.equal(early[name], reference[name]), name


def test_early_stop_off_and_unconverged_use_every_batch(tmp_path, caplog):
    source = make_tiny_model(tmp_path / "src", "llama", seed=5)
    process = [SMOOTHERS["smooth_quant"], STATIC_ALL]
    data = many_calib(tmp_path, 6)
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        run_quant(source, tmp_path / "off", write(tmp_path / "off.yaml", process, data, {"early_stop": False}))
        assert "calibration stopped" not in caplog.text
        strict = {"early_stop": True, "rtol": 1e-9, "window_tokens": 1, "min_tokens": 2}
        run_quant(source, tmp_path / "strict", write(tmp_path / "s.yaml", process, data, strict))
    assert "calibration stopped" not in caplog.text
    assert "calibration used all 6 batches available" in caplog.text
    off, strict_out = saved_tensors(tmp_path / "off"), saved_tensors(tmp_path / "strict")
    for name in off:
        assert torch.equal(off[name], strict_out[name]), name


def test_statistics_that_are_not_extremes_are_never_cut_short(tmp_path, count_forwards, caplog):
    source = make_tiny_model(tmp_path / "src", "llama", seed=5)
    gptq = {"type": "linear_quant", "exclude": ["lm_head"],
            "qconfig": {**STATIC, "weight": {**STATIC["weight"], "method": "gptq"}}}
    rule = {"early_stop": True, "rtol": 2.0, "window_tokens": 1, "min_tokens": 2}
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        run_quant(source, tmp_path / "out", write(tmp_path / "c.yaml", [gptq], many_calib(tmp_path, 5), rule))
    assert "calibration stopped" not in caplog.text
