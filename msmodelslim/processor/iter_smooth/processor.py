"""`iter_smooth`: the established msModelSlim's Iterative Smooth, a SmoothQuant variant (Xiao et al., ICML 2023).

Per subgraph, with a = max|X_j| over the calibration data and w = max_i |W[i, j]| over all targets:

    s_j = max(a_j^α / w_j^(1-α), scale_min)          (α = 0.9 by default)

The subgraphs of a block are smoothed one after another in the order up-down, ov, norm-linear,
linear-linear: each later one measures the target weights as the earlier ones left them (that sequence is the
"iterative" part). For "ov" the scales are computed per query-head channel and averaged over the heads that
share a key/value head. Channels that never fired keep s = 1 instead of collapsing to scale_min.

    - type: iter_smooth
      alpha: 0.9
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.processor.base import register_processor
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats, SubgraphSmoother
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph


def iter_smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                       scale_min: float) -> torch.Tensor:
    s = act_absmax.float().pow(alpha) / weight_absmax.float().clamp(min=smooth.EPS).pow(1 - alpha)
    return torch.where(act_absmax > 0, s.clamp(min=scale_min), torch.ones_like(s))


@register_processor("iter_smooth")
class IterSmoothProcessor(SubgraphSmoother):
    type_name = "iter_smooth"
    order = ("up-down", "ov", "norm-linear", "linear-linear")

    def scales(self, graph: BlockSubgraph, stats: InputStats, targets: list[nn.Module], names: list[str]) -> torch.Tensor:
        weight = smooth.column_absmax([t.weight for t in targets])
        s = iter_smooth_scales(stats.absmax, weight, self.config.alpha, self.config.scale_min)
        if graph.kind == "ov":
            shape = self.ov_shape(graph)
            group = shape.num_heads // shape.num_kv_heads
            s = s.reshape(shape.num_kv_heads, group, shape.head_dim).mean(dim=1).reshape(-1)
        return s
