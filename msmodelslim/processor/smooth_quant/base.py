"""What every smoothing processor shares: picking the adapter's subgraphs, recording the activations at each
subgraph's input during the block's calibration forward, and folding a per-channel scale into source and
targets. Subclasses (smooth_quant, iter_smooth, flex_smooth_quant) only decide the scale.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.model.interface import SmoothSubgraph
from msmodelslim.processor.base import Processor, ProcessorContext
from msmodelslim.processor.matching import select
from msmodelslim.processor.sampling import RowSample
from msmodelslim.processor.smooth_quant import smooth


@dataclass
class InputStats:
    """What one subgraph's input looked like over the calibration forward."""

    absmax: Optional[torch.Tensor] = None  # max |X_j| per input channel, float32
    abs_sum: Optional[torch.Tensor] = None  # Σ |X_j| over tokens, float64 (AWQ uses the mean)
    tokens: int = 0
    sample: RowSample = field(default_factory=RowSample)  # token rows (only when keep_samples)

    def update(self, x: torch.Tensor, keep_samples: bool) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        magnitude = flat.abs()
        absmax, abs_sum = magnitude.amax(dim=0), magnitude.sum(dim=0, dtype=torch.float64)
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.tokens += len(flat)
        if keep_samples:
            self.sample.add(flat)

    def merge(self, collective, features: int, keep_samples: bool) -> None:
        """dp_layer_wise: combine with the other ranks' statistics of the same subgraph input."""
        absmax = self.absmax if self.absmax is not None else torch.zeros(features)
        abs_sum = self.abs_sum if self.abs_sum is not None else torch.zeros(features, dtype=torch.float64)
        self.tokens = collective.sum_int(self.tokens)
        absmax, abs_sum = collective.max(absmax), collective.sum(abs_sum)
        self.absmax, self.abs_sum = (absmax, abs_sum) if self.tokens else (None, None)
        if keep_samples:
            self.sample.merge(collective, features)

    @property
    def abs_mean(self) -> torch.Tensor:
        """mean |X_j| per input channel, float32."""
        return (self.abs_sum / max(self.tokens, 1)).float()

    def samples(self, limit: int) -> torch.Tensor:
        return self.sample.take(limit)


class SubgraphSmoother(Processor):
    """Base of the smoothing processors. `config` needs enable_subgraph_type, include and exclude."""

    type_name = "smoothing"
    # Subgraph kinds in the order they are smoothed within a block (a later kind sees earlier changes).
    order: tuple[str, ...] = ("norm-linear", "linear-linear", "ov", "up-down")
    keep_samples = False

    def __init__(self, config, context: ProcessorContext) -> None:
        self.config = config
        self.context = context
        if not context.structure.smooth_subgraphs:  # e.g. the MoE adapters: nothing would be smoothed, silently
            raise UnsupportedError(
                f"{self.type_name}: adapter {context.adapter_name} describes no smoothing subgraphs "
                f"(ModelStructure.smooth_subgraphs), so it cannot smooth this model; remove {self.type_name} "
                f"from spec.process"
            )
        available = {g.kind for g in context.structure.smooth_subgraphs}
        # A kind left at its default and absent from the adapter is skipped; one the user asked for is an error.
        missing = [k for k in config.enable_subgraph_type if k not in available]
        if missing and "enable_subgraph_type" in config.model_fields_set:
            raise UnsupportedError(
                f"{self.type_name}: adapter {context.adapter_name} describes no {', '.join(missing)} subgraph "
                f"(ModelStructure.smooth_subgraphs); remove it from enable_subgraph_type or extend the adapter"
            )
        if "ov" in config.enable_subgraph_type and context.attention is None:
            raise UnsupportedError(f"{self.type_name}: adapter {context.adapter_name} gives no attention shape for 'ov'")
        self._stats: dict[str, InputStats] = {}
        self._hooks: list = []

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # smoothing rewrites weights in place; it does not decide a layer's scheme

    def _subgraphs(self, block_name: str) -> list[SmoothSubgraph]:
        chosen = []
        for graph in self.context.structure.smooth_subgraphs:
            if graph.kind not in self.config.enable_subgraph_type:
                continue
            targets = [f"{block_name}.{t}" for t in graph.targets]
            if len(select(targets, self.config.include or ["*"], self.config.exclude or [])) == len(targets):
                chosen.append(graph)
        return sorted(chosen, key=lambda g: self.order.index(g.kind))

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for graph in self._subgraphs(block_name):
            stats = self._stats[graph.source] = InputStats()
            first = block.get_submodule(graph.targets[0])
            self._hooks.append(first.register_forward_pre_hook(
                lambda _m, args, s=stats: s.update(args[0], self.keep_samples)))

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # every statistic merges: max, sums, and sampled rows gathered in rank order

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for graph in self._subgraphs(block_name):
            if graph.source in self._stats:
                features = block.get_submodule(graph.targets[0]).in_features
                self._stats[graph.source].merge(collective, features, self.keep_samples)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for graph in self._subgraphs(block_name):
            targets = [block.get_submodule(t) for t in graph.targets]
            if not all(type(t) is nn.Linear for t in targets):
                raise ProcessingError(f"{self.type_name}: {block_name}.{graph.targets[0]} is already quantized; "
                                      f"put {self.type_name} before linear_quant in spec.process")
            stats = self._stats.pop(graph.source, None)
            if stats is None or stats.absmax is None:
                raise ProcessingError(f"{block_name}.{graph.targets[0]} received no calibration data")
            with torch.no_grad():
                s = self.scales(graph, stats, targets)
                smooth.divide_source(block.get_submodule(graph.source), s)
                if graph.kind == "ov":
                    s = smooth.from_kv_channels(s, self.context.attention)
                smooth.multiply_targets(targets, s)

    @abstractmethod
    def scales(self, graph: SmoothSubgraph, stats: InputStats, targets: list[nn.Linear]) -> torch.Tensor:
        """The scale s (X /= s, W[:, j] *= s_j), indexed by the source's output channels: for "ov" one per
        key/value channel (Hkv·D), for every other kind one per target input channel."""
