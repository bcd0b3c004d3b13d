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


def test_block_ranges_reduce_a_shared_input_once_and_see_in_place_changes(monkeypatch):
    from msmodelslim.core import calibration

    calls = []
    real = calibration.channel_extremes
    monkeypatch.setattr(calibration, "channel_extremes", lambda x: calls.append(x.shape) or real(x))
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
    assert recorder._shared.tensor is None  # stop() keeps no activation alive
