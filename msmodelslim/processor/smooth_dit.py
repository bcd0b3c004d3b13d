"""`iter_smooth` and `smooth_quant` on a diffusion transformer's blocks: the text processors' scales and statistics
(processor/iter_smooth/, processor/smooth_quant/: the same `scales`, `InputStats`, `divide_source` and
`multiply_targets`), at the subgraphs the family describes as data (model/diffusion/smoothing.py).

What differs from the text models is where the division X / s goes. A subgraph with a source folds it there (a
norm's gain and bias; to_v's rows for "ov", per head); one without (adaLN-modulated norms, GELU) wraps each target
linear in a `NonFusionSmooth` (ir/non_fusion_smooth.py): its columns are multiplied by s and its input multiplied
by 1/s at run time, saved as `<p>.div.mul_scale` with the linear under `<p>.linear.*` (the established format).
Statistics are max |X_j| of what the first target receives, over the block's calibration forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.non_fusion_smooth import wrap_with_division
from msmodelslim.model.diffusion.smoothing import DitSmoothing
from msmodelslim.model.interface import AttentionShape
from msmodelslim.model.skeleton_edits import has_module
from msmodelslim.processor.base import PROCESSORS, ProcessorContext
from msmodelslim.processor.matching import select
from msmodelslim.processor.smooth_quant.base import InputStats, SubgraphSmoother
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph

log = get_logger("smoothing")

DIT_SMOOTHERS = ("iter_smooth", "smooth_quant")  # the smoothing processors a DiT runs
NON_FUSION = ""  # BlockSubgraph.source of a subgraph whose division is applied at run time


class OnDitBlocks(SubgraphSmoother):
    """Mixed in front of a text smoothing processor (its `type_name`, `order` and `scales` are kept): which
    subgraphs, their statistics and the non-fusion fold come from here."""

    def __init__(self, config, context: ProcessorContext, smoothing: DitSmoothing) -> None:
        # not SubgraphSmoother.__init__: its checks read a text adapter's ModelStructure; these read the family's data
        self.config = config
        self.context = context
        self.smoothing = smoothing
        missing = [k for k in config.enable_subgraph_type if k not in smoothing.kinds]
        if missing and self._asked_for_kinds:
            raise UnsupportedError(f"{self.type_name}: the diffusion family describes no {', '.join(missing)} "
                                   f"smoothing subgraph (DiffusionFamily.smoothing); remove it from "
                                   f"enable_subgraph_type")
        self._block: list[tuple[BlockSubgraph, InputStats]] = []
        self._hooks: list = []
        self._input_scales: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, AttentionShape] = {}  # "ov" source -> the heads of its attention

    # ---- which subgraphs --------------------------------------------------------------------------------
    def _chosen(self, block_name: str, block: nn.Module) -> list[BlockSubgraph]:
        chosen = []
        for described in self.smoothing.subgraphs:
            if described.kind not in self.config.enable_subgraph_type:
                continue
            names = [*described.targets, *([described.source] if described.source else [])]
            if not all(has_module(block, n) for n in names):
                continue
            targets = [f"{block_name}.{t}" for t in described.targets]
            if len(select(targets, self.config.include or ["*"], self.config.exclude or [])) != len(targets):
                continue
            source = described.source or NON_FUSION
            if described.kind == "norm-linear" and source and getattr(block.get_submodule(source), "weight",
                                                                      None) is None:
                source = NON_FUSION  # e.g. norm2 built as nn.Identity: nothing to divide
            if described.kind == "ov":
                self._shapes[source] = _heads(block, described.attention, source)
            chosen.append(BlockSubgraph(described.kind, source, tuple(described.targets)))
        return sorted(chosen, key=lambda g: self.order.index(g.kind))

    def ov_shape(self, graph: BlockSubgraph) -> AttentionShape:
        return self._shapes[graph.source]

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the meta-device DiT: the described linears are linears, "ov" attentions are sized by heads. Every block
        of every list is smoothed where it has the described modules."""
        chosen = 0
        for block_name in block_names:
            block = model.get_submodule(block_name)
            for graph in self._chosen(block_name, block):
                chosen += 1
                for name in graph.targets:
                    if not isinstance(block.get_submodule(name), nn.Linear):
                        raise UnsupportedError(f"{self.type_name}: {block_name}.{name} is a "
                                               f"{type(block.get_submodule(name)).__name__}, not a linear")
        if not chosen:
            log.warning("%s: include/exclude/enable_subgraph_type leave no smoothing subgraph of this DiT; nothing "
                        "will be smoothed", self.type_name)

    # ---- calibration: what the first target receives ------------------------------------------------------
    def before_forward(self, block_name: str, block: nn.Module) -> None:
        self._block = [(graph, self.new_stats()) for graph in self._chosen(block_name, block)]
        for graph, stats in self._block:
            self._hooks.append(block.get_submodule(graph.targets[0]).register_forward_pre_hook(
                lambda _m, args, s=stats: s.update(args[0])))

    def _fold(self, block: nn.Module, graph: BlockSubgraph, targets: list[nn.Module], s: torch.Tensor) -> None:
        if graph.source != NON_FUSION:
            super()._fold(block, graph, targets, s)
            return
        for name in graph.targets:  # W[:, j] *= s_j; the input is divided by s at run time
            wrap_with_division(block, name, s.float())


def _heads(block: nn.Module, attention: Optional[str], source: str) -> AttentionShape:
    """An "ov" subgraph's value heads: as many key/value heads as query heads (DiT attentions are multi-head)."""
    module = block.get_submodule(attention) if attention else None
    heads = getattr(module, "heads", None)
    rows = block.get_submodule(source).weight.shape[0]
    if not isinstance(heads, int) or rows % heads:
        raise UnsupportedError(f"smoothing 'ov': {attention} gives no head count dividing {source}'s {rows} rows")
    return AttentionShape(heads, heads, rows // heads)


def build_dit_smoother(config, context: ProcessorContext, smoothing: Optional[DitSmoothing],
                       family_name: str) -> SubgraphSmoother:
    """The text processor `config.type` with the DiT's subgraphs; refused by name for a family without them."""
    if smoothing is None:
        raise UnsupportedError(f"{config.type} is not supported yet for {family_name} (it belongs to the diffusion "
                               f"transformer work: its adapter describes no smoothing subgraphs, "
                               f"DiffusionFamily.smoothing); remove the step")
    text_cls = PROCESSORS[config.type]
    cls = type(f"Dit{text_cls.__name__}", (OnDitBlocks, text_cls), {})
    return cls(config, context, smoothing)
