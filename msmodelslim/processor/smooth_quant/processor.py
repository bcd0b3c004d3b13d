"""`smooth_quant`: SmoothQuant (Xiao et al., ICML 2023) over the subgraphs the adapter describes.

Per block: record max|X_j| at the input of each subgraph's targets during the calibration forward, then fold
s = max|X|^α / max|W|^(1-α) into source and targets (see smooth.py). Float output is unchanged; a later
`linear_quant` sees flatter activations.

    - type: smooth_quant
      alpha: 0.5
      enable_subgraph_type: [norm-linear, ov, up-down]
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.model.interface import SmoothSubgraph
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.matching import select
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.config import SmoothQuantConfig


@register_processor("smooth_quant")
class SmoothQuantProcessor(Processor):
    def __init__(self, config: SmoothQuantConfig, context: ProcessorContext) -> None:
        self.config = config
        self.context = context
        available = {g.kind for g in context.structure.smooth_subgraphs}
        missing = [k for k in config.enable_subgraph_type if k not in available]
        if missing:
            raise UnsupportedError(
                f"smooth_quant: adapter {context.adapter_name} describes no {', '.join(missing)} subgraph "
                f"(ModelStructure.smooth_subgraphs); remove it from enable_subgraph_type or extend the adapter"
            )
        if "ov" in config.enable_subgraph_type and context.attention is None:
            raise UnsupportedError(f"smooth_quant: adapter {context.adapter_name} gives no attention shape for 'ov'")
        self._absmax: dict[str, torch.Tensor] = {}
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
        return chosen

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for graph in self._subgraphs(block_name):
            first = block.get_submodule(graph.targets[0])

            def record(_module, args, key=graph.source):
                x = args[0].detach()
                absmax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
                self._absmax[key] = absmax if key not in self._absmax else torch.maximum(self._absmax[key], absmax)

            self._hooks.append(first.register_forward_pre_hook(record))

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for graph in self._subgraphs(block_name):
            targets = [block.get_submodule(t) for t in graph.targets]
            if not all(type(t) is nn.Linear for t in targets):
                raise ProcessingError(f"smooth_quant: {block_name}.{graph.targets[0]} is already quantized; "
                                 f"put smooth_quant before linear_quant in spec.process")
            act = self._absmax.pop(graph.source, None)
            if act is None:
                raise ProcessingError(f"{block_name}.{graph.targets[0]} received no calibration data")
            weight = smooth.column_absmax([t.weight for t in targets])
            if graph.kind == "ov":
                shape = self.context.attention
                s_kv = smooth.smoothing_scales(smooth.to_kv_channels(act, shape),
                                               smooth.to_kv_channels(weight, shape), self.config.alpha)
                smooth.divide_source(block.get_submodule(graph.source), s_kv)
                smooth.multiply_targets(targets, smooth.from_kv_channels(s_kv, shape))
            else:
                s = smooth.smoothing_scales(act, weight, self.config.alpha)
                smooth.divide_source(block.get_submodule(graph.source), s)
                smooth.multiply_targets(targets, s)
