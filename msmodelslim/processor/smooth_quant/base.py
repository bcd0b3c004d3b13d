"""What every smoothing processor shares: picking the adapter's subgraphs in each block (routed experts
expanded, subgraphs the block lacks skipped: subgraphs.py), recording the activations at each subgraph's
input during the block's calibration forward, and folding a per-channel scale into source and targets.
Subclasses (smooth_quant, iter_smooth, flex_smooth_quant, flex_awq_ssz, awq) only decide the scale.
"""
from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from msmodelslim.core.calibration import channel_extremes
from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.model.interface import AttentionShape
from msmodelslim.processor.base import Processor, ProcessorContext
from msmodelslim.processor.matching import select
from msmodelslim.processor.sampling import RowSample
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph, block_subgraphs

log = get_logger("smoothing")


@dataclass
class InputStats:
    """What one subgraph's input looked like over the calibration forward."""

    keep_mean: bool = False  # also Σ |X_j| (AWQ's mean |X_j|): a float64 sum, the costliest statistic here
    keep_samples: bool = False  # also token rows (the scored smoothers)
    absmax: Optional[torch.Tensor] = None  # max |X_j| per input channel, float32
    abs_sum: Optional[torch.Tensor] = None  # Σ |X_j| over tokens, float64 (only with keep_mean)
    tokens: int = 0
    sample: RowSample = field(default_factory=RowSample)  # token rows (only with keep_samples)

    def update(self, x: torch.Tensor) -> None:
        extremes = channel_extremes(x)  # x itself: the runner's ranges of the same activation reuse the reduction
        if extremes is None:
            return
        flat = x.detach().reshape(-1, x.shape[-1])
        # max |x| = max(max x, -min x), reduced in x's own dtype: no full-size float32 |x| copy
        absmax = torch.maximum(extremes[1], extremes[0].neg())
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        if self.keep_mean:
            abs_sum = flat.float().abs().sum(dim=0, dtype=torch.float64)
            self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.tokens += len(flat)
        if self.keep_samples:
            self.sample.add(flat.float())

    def merge(self, collective, features: int) -> None:
        """dp_layer_wise: combine with the other ranks' statistics of the same subgraph input."""
        absmax = self.absmax if self.absmax is not None else torch.zeros(features)
        self.tokens = collective.sum_int(self.tokens)
        absmax = collective.max(absmax)
        self.absmax = absmax if self.tokens else None
        if self.keep_mean:
            abs_sum = self.abs_sum if self.abs_sum is not None else torch.zeros(features, dtype=torch.float64)
            abs_sum = collective.sum(abs_sum)
            self.abs_sum = abs_sum if self.tokens else None
        if self.keep_samples:
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
    rewrites_activations = True
    # Subgraph kinds in the order they are smoothed within a block (a later kind sees earlier changes).
    order: tuple[str, ...] = ("norm-linear", "linear-linear", "ov", "up-down")
    keep_samples = False
    keep_mean = False  # AWQ's scaling needs mean |X_j| too

    def __init__(self, config, context: ProcessorContext) -> None:
        self.config = config
        self.context = context
        structure = context.structure.smooth_subgraphs
        if not structure:  # nothing would be smoothed, silently
            raise UnsupportedError(
                f"{self.type_name}: adapter {context.adapter_name} describes no smoothing subgraphs "
                f"(ModelStructure.smooth_subgraphs): smoothing this model family is not supported yet; remove "
                f"{self.type_name} from spec.process"
            )
        available = {g.kind for g in structure}
        # A kind left at its default and absent from the adapter is skipped; one the user asked for is an error.
        missing = [k for k in config.enable_subgraph_type if k not in available]
        if missing and self._asked_for_kinds:
            raise UnsupportedError(
                f"{self.type_name}: adapter {context.adapter_name} describes no {', '.join(missing)} subgraph "
                f"(ModelStructure.smooth_subgraphs); remove it from enable_subgraph_type or extend the adapter"
            )
        if "ov" in config.enable_subgraph_type:
            layouts = {g.layout for g in structure if g.kind == "ov"}
            if "gqa" in layouts and context.attention is None:
                raise UnsupportedError(f"{self.type_name}: adapter {context.adapter_name} gives no attention "
                                       f"shape for 'ov'")
            if "mla" in layouts and context.mla is None:
                raise UnsupportedError(f"{self.type_name}: adapter {context.adapter_name} gives no MLA shape "
                                       f"(mla_shape) for its kv_b_proj -> o_proj 'ov' subgraph")
        self._block: list[tuple[BlockSubgraph, InputStats]] = []
        self._hooks: list = []
        self._input_scales: dict[str, torch.Tensor] = {}  # target linear (relative name) -> its input's divisor

    @property
    def range_statistics(self) -> bool:
        return not (self.keep_samples or self.keep_mean)  # max |X_j| only; samples and sums are not extremes

    @property
    def _asked_for_kinds(self) -> bool:
        return "enable_subgraph_type" in self.config.model_fields_set

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # smoothing rewrites weights in place; it does not decide a layer's scheme

    # ---- which subgraphs --------------------------------------------------------------------------------
    def _chosen(self, block_name: str, block: nn.Module) -> list[BlockSubgraph]:
        if not self.context.structure.is_decoder_layer(block_name):
            return []  # e.g. a VLM's vision tower: the subgraphs describe decoder layers
        chosen = []
        for graph in block_subgraphs(self.context.structure.smooth_subgraphs, block, block_name):
            if graph.kind not in self.config.enable_subgraph_type:
                continue
            targets = [f"{block_name}.{t}" for t in graph.targets]
            if len(select(targets, self.config.include or ["*"], self.config.exclude or [])) == len(targets):
                chosen.append(graph)
        return sorted(chosen, key=lambda g: self.order.index(g.kind))

    def ov_shape(self, graph: BlockSubgraph) -> AttentionShape:
        """The value heads an "ov" scale is shared over: GQA's key/value heads, or MLA's heads (one each)."""
        if graph.layout == "mla":
            mla = self.context.mla
            return AttentionShape(mla.num_heads, mla.num_heads, mla.v_head_dim)
        return self.context.attention

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: the described subgraphs must exist in it, their modules must be scalable and
        sized as the attention shape says; subclasses check each chosen subgraph further (check_subgraph)."""
        present, chosen = Counter(), Counter()
        for block_name in block_names:
            if not self.context.structure.is_decoder_layer(block_name):
                continue
            block = model.get_submodule(block_name)
            present.update(g.kind for g in block_subgraphs(self.context.structure.smooth_subgraphs, block, block_name))
            for graph in self._chosen(block_name, block):
                chosen[graph.kind] += 1
                targets = [block.get_submodule(t) for t in graph.targets]
                self._check_modules(block_name, block, graph, targets)
                self.check_subgraph(block_name, graph, targets)
        described = self.context.structure.smooth_subgraphs
        if not present:
            first = described[0]
            raise UnsupportedError(
                f"{self.type_name}: none of the {len(described)} smoothing subgraphs adapter "
                f"{self.context.adapter_name} describes exists in this model's decoder blocks (e.g. {first.source} "
                f"-> {', '.join(first.targets)}); the checkpoint's module names differ from the adapter's"
            )
        asked_absent = [k for k in self.config.enable_subgraph_type if self._asked_for_kinds and not present[k]]
        if asked_absent:
            raise UnsupportedError(f"{self.type_name}: enable_subgraph_type asks for {', '.join(asked_absent)}, "
                                   f"but no decoder block of this model has such a subgraph")
        if not chosen:
            log.warning("%s: include/exclude leave no smoothing subgraph of this model; nothing will be smoothed",
                        self.type_name)

    def _check_modules(self, block_name: str, block: nn.Module, graph: BlockSubgraph, targets: list[nn.Module]) -> None:
        for name, target in zip(graph.targets, targets):
            weight = getattr(target, "weight", None)
            if not isinstance(target, QuantLinear) and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
                raise UnsupportedError(f"{self.type_name}: {block_name}.{name} is a {type(target).__name__} with no "
                                       f"2-D weight; smoothing scales the columns of linears (and of routers that "
                                       f"compute x·Wᵀ)")
        if graph.kind != "ov":
            return
        shape, source = self.ov_shape(graph), block.get_submodule(graph.source)
        rows = shape.num_kv_heads * shape.head_dim
        if graph.layout == "mla":
            rows = shape.num_heads * (self.context.mla.qk_nope_head_dim + shape.head_dim)
        columns = shape.num_heads * shape.head_dim
        if source.weight.shape[0] != rows or targets[0].weight.shape[1] != columns:
            raise UnsupportedError(f"{self.type_name}: {block_name}.{graph.source} has {source.weight.shape[0]} rows "
                                   f"and {graph.targets[0]} {targets[0].weight.shape[1]} columns, but config.json's "
                                   f"attention shape says {rows} and {columns}; 'ov' cannot be smoothed")

    def check_subgraph(self, block_name: str, graph: BlockSubgraph, targets: list[nn.Module]) -> None:
        """A subclass's plan-time check of one chosen subgraph (on the empty model)."""

    # ---- calibration ------------------------------------------------------------------------------------
    def new_stats(self) -> InputStats:
        return InputStats(keep_mean=self.keep_mean, keep_samples=self.keep_samples)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        self._block = [(graph, self.new_stats()) for graph in self._chosen(block_name, block)]
        for graph, stats in self._block:
            if graph.kind in ("norm-linear", "linear-linear"):  # the source's output is the targets' input
                self._hooks.append(block.get_submodule(graph.source).register_forward_hook(
                    lambda _m, _args, out, s=stats: s.update(out)))
            else:  # through attention or the gated activation: what the first target receives
                self._hooks.append(block.get_submodule(graph.targets[0]).register_forward_pre_hook(
                    lambda _m, args, s=stats: s.update(args[0])))

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # every statistic merges: max, sums, and sampled rows gathered in rank order

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for graph, stats in self._block:  # the same subgraphs in the same order on every rank
            features = block.get_submodule(graph.targets[0]).weight.shape[1]
            stats.merge(collective, features)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._input_scales = {}
        starved, experts, unscaled = Counter(), Counter(), 0
        for graph, stats in self._block:
            targets = [block.get_submodule(t) for t in graph.targets]
            if any(isinstance(t, QuantLinear) for t in targets):
                raise ProcessingError(f"{self.type_name}: {block_name}.{graph.targets[0]} is already quantized; "
                                      f"put {self.type_name} before linear_quant in spec.process")
            if graph.expert is not None:
                experts[graph.source.replace(f".{graph.expert}.", ".*.")] += 1
            if stats.absmax is None:
                if graph.expert is None:
                    raise ProcessingError(f"{block_name}.{graph.targets[0]} received no calibration data")
                starved[graph.source.replace(f".{graph.expert}.", ".*.")] += 1  # keeps s = 1
                continue
            with torch.no_grad():
                s = self.scales(graph, stats, targets, [f"{block_name}.{t}" for t in graph.targets])
                if s is None:
                    unscaled += 1
                    continue
                self._fold(block, graph, targets, s)
        self._block = []
        for pattern, count in sorted(starved.items()):
            log.info("%s: %d of %d routed experts received no calibration tokens; their %s subgraphs (source %s) "
                     "keep scale 1", block_name, count, experts[pattern], self.type_name, pattern)
        if unscaled:
            log.info("%s: %d subgraph(s) left unscaled: no later step of spec.process quantizes their targets",
                     block_name, unscaled)

    def _fold(self, block: nn.Module, graph: BlockSubgraph, targets: list[nn.Module], s: torch.Tensor) -> None:
        """X /= s into the source, W[:, j] *= s_j into every target."""
        source_s = target_s = s
        if graph.kind == "ov":
            target_s = smooth.from_kv_channels(s, self.ov_shape(graph))
            if graph.layout == "mla":
                source_s = smooth.mla_value_rows(s, self.context.mla)
        offset = self.context.structure.norm_offset if graph.kind == "norm-linear" else 0.0
        smooth.divide_source(block.get_submodule(graph.source), source_s, offset)
        smooth.multiply_targets(targets, target_s)
        for name, target in zip(graph.targets, targets):
            if isinstance(target, nn.Linear):
                previous = self._input_scales.get(name)
                self._input_scales[name] = target_s.float() if previous is None else previous * target_s.float()

    def input_scaling(self, block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """Smoothing divides each target's input channel j by s_j (source rows or norm gain divided, target
        columns multiplied): the targets' outputs, hence every other linear's input, are unchanged."""
        return dict(self._input_scales)

    @abstractmethod
    def scales(self, graph: BlockSubgraph, stats: InputStats, targets: list[nn.Module],
               names: list[str]) -> Optional[torch.Tensor]:
        """The scale s (X /= s, W[:, j] *= s_j), indexed by the source's output channels: for "ov" one per
        key/value channel (Hkv·D; MLA: H·v_head_dim), for every other kind one per target input channel.
        `names` are the targets' full names. None leaves the subgraph as it is."""
