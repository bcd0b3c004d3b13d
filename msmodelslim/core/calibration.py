"""What one calibration forward of a block leaves behind for the steps after it, and when it may stop early.

Per-channel input ranges. While a block's calibration forward runs, the runner records, for every `nn.Linear`
of the block, the running min and max of each input channel j over all tokens: m_j = min_i x_ij, M_j = max_i
x_ij. A smoothing step then folds a scale s (> 0) into the block, so linear input channel j becomes x_ij / s_j,
exactly in real arithmetic; its new range is [m_j / s_j, M_j / s_j] (division by s_j > 0 keeps the order). A
later static per-tensor min/max activation observer needs only min_j m_j / s_j and max_j M_j / s_j, so it
reads these instead of asking for a second forward (its range then agrees with a real forward up to float
rounding of the smoothed weights). Processors declare what they did to the inputs (`Processor.input_scaling`):
a per-channel scale is carried through; anything else (rotations that mix channels, quantized weights whose
outputs feed other linears, undeclared changes) drops the ranges, and the next calibrating step gets a real
forward, as before.

Early stopping. A forward whose processors all collect running extremes of linear inputs (max |x| for
smoothing, min/max for static ranges: `Processor.range_statistics`) stops once those extremes have converged:
after at least `min_tokens` tokens, when no channel's running min or max of any linear input moved by more
than `rtol` x that linear's largest input magnitude (max over its channels of max |x_j|) over the last
`window_tokens` tokens. The yardstick is the linear's largest channel, not each channel's own range: the
statistics these extremes feed are set by the large channels (a per-tensor static range is the largest
channel's; a per-token quantization step after smoothing is set by the largest smoothed channel), and the
small channels' extremes of a long-tailed activation keep growing by tens of percent for as long as data
comes (measured on SmolLM2: from window 16 to 32 the median linear's worst channel still moved 43 % of its own
range), so a per-channel yardstick never fires. Running extremes only grow; once that many tokens have not
widened them by more than rtol, the remaining batches are taken to widen them by as little (a heuristic, not a
bound: a rare outlier late in the set is missed). `spec.calibration.early_stop: false` keeps the whole
calibration set. Statistics that are not extremes (GPTQ Hessians, histograms, AWQ means, row samples) are never
cut short: their forward runs every batch.

Precision. `spec.calibration.precision: bfloat16` runs a forward whose processor collects only running extremes
of linear inputs (`Processor.range_statistics`: the same forwards early stopping may cut) under
`torch.autocast(dtype=bfloat16)`, so the block's matmuls run in bfloat16 (cheaper where the hardware has
bfloat16 units). Only those forwards: autocast turns every matmul inside the forward to bfloat16, including the
ones other processors' hooks run (GPTQ's X^T X, AWQ's candidate outputs), while a min/max is exact in any
dtype. The extremes then are those of bfloat16-rounded activations (8 significant bits), which moves
smoothing scales and static ranges by up to a few parts in a thousand per layer, compounding over the blocks.
Any other forward runs in float32 as before (the runner says so once per step), and the block outputs that
autocast produced in bfloat16 go back to the block's own dtype, so the next block and everything after it
see the dtypes of a float32 run.

Later blocks receive the outputs of the batches that were forwarded, so a block that stopped after n batches
leaves the following blocks at most those n batches: the set only shrinks along the model, every block is
calibrated on a prefix of the same batches, and no batch is forwarded only to feed the next block (which
would cost the whole forward again). A block that runs out of batches before it converges is logged.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


MEMO = "_msmodelslim_channel_extremes"  # the attribute channel_extremes leaves on a reduced activation
ROW_GROUP = 16  # rows reduced first in groups of this many: on CPU 1.3-1.6x faster than one pass over all rows


def reduce_channels(x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) over every token of `x`, float32 (None: no token), computed now. A min of mins is
    the min: reducing groups of rows first, then the groups, gives the same values."""
    flat = x.detach().reshape(-1, x.shape[-1])
    rows = len(flat)
    if not rows:
        return None
    body = rows - rows % ROW_GROUP
    lows, highs = [], []
    if body:
        grouped = flat[:body].view(-1, ROW_GROUP, flat.shape[1])
        lows.append(grouped.amin(dim=1).amin(dim=0))
        highs.append(grouped.amax(dim=1).amax(dim=0))
    if body < rows:
        lows.append(flat[body:].amin(dim=0))
        highs.append(flat[body:].amax(dim=0))
    low = lows[0] if len(lows) == 1 else torch.minimum(*lows)
    high = highs[0] if len(highs) == 1 else torch.maximum(*highs)
    return low.float(), high.float()


def channel_extremes(x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) over every token of `x` (last dim = channels), float32; None when it has no token.
    Reduced in the activation's own dtype, then widened: exact, and no full-size copy.

    The result is kept on `x` itself for its current version (any in-place change bumps it), so everything that
    looks at the same activation in one forward reduces it once: the linears fed one tensor (q/k/v from one norm,
    gate/up) and a smoothing step's statistics beside the runner's ranges. It goes when the activation goes. The
    returned tensors are shared between those callers: never modify them in place."""
    try:
        version = x._version  # inference-mode tensors have none: no memo then
    except RuntimeError:
        version = None
    memo = getattr(x, MEMO, None)
    if memo is not None and version is not None and memo[0] == version:
        return memo[1]
    extremes = reduce_channels(x)
    if version is not None:
        setattr(x, MEMO, (version, extremes))
    return extremes


@dataclass
class ChannelRange:
    """Running per-input-channel min and max of one linear's input (float32, `in_features` each)."""

    min: torch.Tensor
    max: torch.Tensor

    @classmethod
    def empty(cls, features: int) -> "ChannelRange":
        return cls(torch.full((features,), float("inf")), torch.full((features,), float("-inf")))

    def update(self, x: torch.Tensor) -> None:
        self.include(channel_extremes(x))

    def include(self, extremes: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Widen to per-channel (min, max) of more tokens (None: no tokens)."""
        if extremes is None:
            return
        low, high = extremes
        if self.min.device != low.device:  # kept where the activations are: no copy per batch
            self.min, self.max = self.min.to(low.device), self.max.to(low.device)
        torch.minimum(self.min, low, out=self.min)
        torch.maximum(self.max, high, out=self.max)

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.max).all())

    def divided(self, s: torch.Tensor) -> "ChannelRange":
        """The range of x_j / s_j (s > 0)."""
        s = s.detach().float().to(self.min.device)
        return ChannelRange(self.min / s, self.max / s)

    def tensor_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max over every element (what a per-tensor min/max observer would have seen)."""
        return self.min.amin(), self.max.amax()

    def copy(self) -> "ChannelRange":
        return ChannelRange(self.min.clone(), self.max.clone())


@dataclass
class BlockInputRanges:
    """Per-channel ranges of the inputs of a block's linears (names relative to the block), as the block is now."""

    ranges: dict[str, ChannelRange] = field(default_factory=dict)
    _hooks: list = field(default_factory=list, repr=False)

    @classmethod
    def record(cls, block: nn.Module) -> "BlockInputRanges":
        """Start recording every nn.Linear's input during the forward that follows; call `stop` after it."""
        recorder = cls()
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                r = recorder.ranges[name] = ChannelRange.empty(module.in_features)
                recorder._hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, r=r: r.update(args[0])))
        return recorder

    def stop(self) -> "BlockInputRanges":
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return self

    def seen(self, name: str) -> bool:
        return name in self.ranges and self.ranges[name].seen

    def __getitem__(self, name: str) -> ChannelRange:
        return self.ranges[name]

    def merge(self, collective) -> None:
        """dp_layer_wise: min and max over every rank's batches (the same names in the same order on each)."""
        for name in sorted(self.ranges):
            r = self.ranges[name]
            r.min, r.max = collective.min(r.min), collective.max(r.max)

    def scaled(self, scaling: Optional[dict[str, torch.Tensor]]) -> Optional["BlockInputRanges"]:
        """The ranges after a processor divided input channel j of linear `name` by scaling[name][j]; None when
        the change is unknown (`scaling` None), since the ranges then no longer describe the block."""
        if scaling is None:
            return None
        return BlockInputRanges({name: r.divided(scaling[name]) if name in scaling else r
                                 for name, r in self.ranges.items()})

    def snapshot(self) -> dict[str, ChannelRange]:
        return {name: r.copy() for name, r in self.ranges.items()}


@dataclass(frozen=True)
class EarlyStop:
    """Stop a calibration forward, after at least `min_tokens` tokens, once no linear input's per-channel running
    min/max moved by more than `rtol` x that linear's largest max |x| over the last `window_tokens` tokens. Counted in
    tokens, not batches: a batch holds 1 to 16 samples of one length (adapter.handle_dataset)."""

    rtol: float = 0.05
    window_tokens: int = 8192
    min_tokens: int = 16384


def relative_change(before: dict[str, ChannelRange], now: dict[str, ChannelRange]) -> float:
    """max over linears of (max over seen channels j of max(|Δmin_j|, |Δmax_j|)) / (max over seen channels of
    max(|min_j|, |max_j|)); a channel that was unseen before and is seen now counts as a change of 1."""
    worst = 0.0
    for name, r in now.items():
        old = before[name]
        seen = torch.isfinite(r.max)
        if not bool(seen.any()):
            continue
        was_seen = torch.isfinite(old.max)
        if bool((seen & ~was_seen).any()):
            return 1.0
        lo, hi, old_lo, old_hi = r.min[seen], r.max[seen], old.min[seen], old.max[seen]
        largest = float(torch.maximum(lo.abs(), hi.abs()).max())
        change = float(torch.maximum((lo - old_lo).abs(), (hi - old_hi).abs()).max())
        if largest > 0:
            worst = max(worst, change / largest)
    return worst


class Convergence:
    """Fed after each batch with the recorder it watches; says when the recorded ranges have converged under `rule`."""

    def __init__(self, rule: EarlyStop, ranges: BlockInputRanges) -> None:
        self.rule, self.ranges = rule, ranges
        self.history: deque[tuple[int, dict[str, ChannelRange]]] = deque()  # (tokens seen, ranges then)
        self.tokens = 0
        self.last_change = float("inf")

    def after_batch(self, tokens: int) -> bool:
        """Record the state after one more batch of `tokens` tokens; True when the forward may stop here."""
        self.tokens += tokens
        self.history.append((self.tokens, self.ranges.snapshot()))
        horizon = self.tokens - self.rule.window_tokens
        while len(self.history) >= 2 and self.history[1][0] <= horizon:  # keep the newest state old enough
            self.history.popleft()
        if self.history[0][0] > horizon:
            return False
        self.last_change = relative_change(self.history[0][1], self.history[-1][1])
        return self.tokens >= self.rule.min_tokens and self.last_change <= self.rule.rtol


@dataclass
class ReducedPrecision:
    """`spec.calibration.precision` other than float32: the dtype range-only calibration forwards autocast to,
    and (per run) the steps the runner has already said it does not apply to."""

    dtype: torch.dtype = torch.bfloat16
    declined: set[tuple[int, str]] = field(default_factory=set)  # (spec.process index, why): already logged
    chosen: bool = False  # picked by `precision: auto`, not asked for: where it does not apply is not news

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
