"""The running activation statistics (smoothing's max |X_j| and mean |X_j|, per-channel ranges, per-tensor min/max)
are reduced in the activation's own dtype: the same float32 values as widening every element first."""
import pytest
import torch

from msmodelslim.core.calibration import ChannelRange
from msmodelslim.processor.smooth_quant.base import InputStats
from msmodelslim.quantizer.observer import MinMaxObserver


def batches(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(3, 5, 8, generator=g) * 10, torch.randn(2, 7, 8, generator=g)]
    out[0][0, 0, 3] = -1e4  # a channel whose largest magnitude is negative
    out[1][1, 2, 5] = -0.0
    return [b.to(dtype) for b in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_statistics_equal_the_widened_reference(dtype):
    xs = batches(dtype)
    rows = torch.cat([x.reshape(-1, 8).float() for x in xs])
    stats, with_mean = InputStats(), InputStats(keep_mean=True)
    channel, tensor = ChannelRange.empty(8), MinMaxObserver()
    for x in xs:
        for s in (stats, with_mean):
            s.update(x)
        channel.update(x)
        tensor.update(x)
    assert torch.equal(stats.absmax, rows.abs().amax(0)) and stats.absmax.dtype == torch.float32
    assert stats.abs_sum is None and stats.tokens == len(rows)
    assert torch.equal(with_mean.absmax, stats.absmax)
    torch.testing.assert_close(with_mean.abs_mean, rows.abs().mean(0))
    assert torch.equal(channel.min, rows.amin(0)) and torch.equal(channel.max, rows.amax(0))
    assert tensor.min == rows.min() and tensor.max == rows.max() and tensor.min.dtype == torch.float32


def test_a_nan_still_shows_in_the_statistics():
    x = torch.ones(4, 3)
    x[2, 1] = float("nan")
    stats = InputStats()
    stats.update(x)
    assert torch.isnan(stats.absmax[1]) and not torch.isnan(stats.absmax[0])


class _SharedInputBlock(torch.nn.Module):
    """q/k/v-like linears fed one tensor, then a linear fed a tensor changed in place after the first read."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x) + self.k(x) + self.v(x)
        self.a(y)
        y.mul_(-3)  # same object, new values: must be reduced again
        return self.b(y)


def _counting_reductions(monkeypatch) -> list:
    from msmodelslim.core import calibration

    calls = []
    real = calibration.reduce_channels
    monkeypatch.setattr(calibration, "reduce_channels", lambda x: calls.append(tuple(x.shape)) or real(x))
    return calls


def test_block_ranges_reduce_a_shared_input_once_and_see_in_place_changes(monkeypatch):
    from msmodelslim.core import calibration

    calls = _counting_reductions(monkeypatch)
    torch.manual_seed(0)
    block, xs = _SharedInputBlock(), batches(torch.float32)
    recorder = calibration.BlockInputRanges.record(block)
    with torch.no_grad():
        for x in xs:
            block(x)
    recorder.stop()
    assert len(calls) == 3 * len(xs)  # x once for q/k/v, y before and after the in-place change
    with torch.no_grad():
        for name, inputs in (("q", xs), ("k", xs), ("v", xs)):
            rows = torch.cat([x.reshape(-1, 8) for x in inputs])
            assert torch.equal(recorder[name].min, rows.amin(0)) and torch.equal(recorder[name].max, rows.amax(0))
        ys = [block.q(x) + block.k(x) + block.v(x) for x in xs]
        for name, inputs in (("a", ys), ("b", [-3 * y for y in ys])):
            rows = torch.cat([y.reshape(-1, 8) for y in inputs])
            assert torch.equal(recorder[name].min, rows.amin(0)) and torch.equal(recorder[name].max, rows.amax(0))


def test_smoothing_statistics_and_block_ranges_share_one_reduction(monkeypatch):
    """The smoothing step's max |X_j| and the runner's per-channel ranges of the same activation, in one forward:
    reduced once, and each still equal to its own reference."""
    import weakref

    from msmodelslim.core import calibration

    calls = _counting_reductions(monkeypatch)
    torch.manual_seed(0)
    block, stats = _SharedInputBlock(), InputStats()
    hook = block.q.register_forward_pre_hook(lambda _m, args: stats.update(args[0]))  # before the ranges' hook
    recorder = calibration.BlockInputRanges.record(block)
    xs = batches(torch.bfloat16)
    block.to(torch.bfloat16)
    with torch.no_grad():
        for x in xs:
            block(x)
    recorder.stop()
    hook.remove()
    assert len(calls) == 3 * 2  # per batch: x (for q/k/v and the smoothing statistics), y, y changed in place
    rows = torch.cat([x.reshape(-1, 8).float() for x in xs])
    assert torch.equal(stats.absmax, rows.abs().amax(0)) and stats.tokens == len(rows)
    assert torch.equal(recorder["q"].min, rows.amin(0)) and torch.equal(recorder["q"].max, rows.amax(0))
    # the memo lives on the activation: nothing keeps the activation itself alive
    probe = weakref.ref(xs[0])
    del xs, x
    assert probe() is None


@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 7, 8), (1, 16, 8), (3, 1, 8)])  # whole groups, a tail, one, none
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_reduction_equals_a_row_by_row_reference(shape, dtype):
    from msmodelslim.core.calibration import reduce_channels

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 100).to(dtype)
    rows = x.reshape(-1, 8).float()
    rows[-1, 2] = 1e6  # extremes in the last rows (the tail when there is one)
    rows[-1, 4] = -1e6
    x = rows.reshape(shape).to(dtype)
    low, high = reduce_channels(x)
    want_low, want_high = rows[0].clone(), rows[0].clone()
    for row in x.reshape(-1, 8).float():  # one row at a time
        for j in range(8):
            want_low[j] = min(want_low[j], row[j])
            want_high[j] = max(want_high[j], row[j])
    assert torch.equal(low, want_low) and torch.equal(high, want_high) and low.dtype == torch.float32
    x.reshape(-1, 8)[len(rows) // 2, 6] = float("nan")
    low, high = reduce_channels(x)
    assert torch.isnan(low[6]) and torch.isnan(high[6]) and not torch.isnan(low[5])
