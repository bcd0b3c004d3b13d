"""`smooth_quant`: SmoothQuant (Xiao et al., ICML 2023) over the subgraphs the adapter describes.

Per block: record max|X_j| at the input of each subgraph's targets during the calibration forward, then fold
s = max|X|^α / max|W|^(1-α) into source and targets (see smooth.py). Float output is unchanged; a later
`linear_quant` sees flatter activations. For "ov" the statistics are first reduced (max) over the query heads
that share a key/value head, so one scale serves each v_proj row.

    - type: smooth_quant
      alpha: 0.5
      enable_subgraph_type: [norm-linear, ov, up-down]
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.processor.base import register_processor
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats, SubgraphSmoother
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph


@register_processor("smooth_quant")
class SmoothQuantProcessor(SubgraphSmoother):
    type_name = "smooth_quant"

    def scales(self, graph: BlockSubgraph, stats: InputStats, targets: list[nn.Module], names: list[str]) -> torch.Tensor:
        act, weight = stats.absmax, smooth.column_absmax([t.weight for t in targets])
        if graph.kind == "ov":
            shape = self.ov_shape(graph)
            act, weight = smooth.to_kv_channels(act, shape), smooth.to_kv_channels(weight, shape)
        return smooth.smoothing_scales(act, weight, self.config.alpha)
