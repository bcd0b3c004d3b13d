"""`flex_smooth_quant`: the established msModelSlim's Flex Smooth Quant, SmoothQuant (Xiao et al., ICML 2023)
with two exponents searched per subgraph against the error of the real int8 product (search.py).

    s_j = max|X_j|^α / max|W_j|^β

The search runs on up to SEARCH_TOKENS token rows sampled evenly from the calibration forward; the scale
itself uses the ranges of all tokens. For "ov", ranges are reduced (max) over the query heads sharing a
key/value head, so one scale serves each v_proj row; the search scores o_proj.

    - type: flex_smooth_quant       # alpha/beta empty: searched
      act_scope: per_token          # or per_tensor when the following linear_quant is static
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.logging import get_logger
from msmodelslim.model.interface import SmoothSubgraph
from msmodelslim.processor.base import register_processor
from msmodelslim.processor.flex_smooth_quant.search import flex_scales, search_alpha_beta
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats, SubgraphSmoother

SEARCH_TOKENS = 512
log = get_logger("flex_smooth_quant")


@register_processor("flex_smooth_quant")
class FlexSmoothQuantProcessor(SubgraphSmoother):
    type_name = "flex_smooth_quant"
    keep_samples = True

    def scales(self, graph: SmoothSubgraph, stats: InputStats, targets: list[nn.Linear]) -> torch.Tensor:
        act, weight_absmax = stats.absmax, smooth.column_absmax([t.weight for t in targets])
        expand = lambda s: s  # noqa: E731 - source space equals target space except for "ov"
        if graph.kind == "ov":
            shape = self.context.attention
            act, weight_absmax = smooth.to_kv_channels(act, shape), smooth.to_kv_channels(weight_absmax, shape)
            expand = lambda s: smooth.from_kv_channels(s, shape)  # noqa: E731
        weight = torch.cat([t.weight.detach().float() for t in targets])
        result = search_alpha_beta(stats.samples(SEARCH_TOKENS), weight,
                                   lambda a, b: expand(flex_scales(act, weight_absmax, a, b)),
                                   self.config.act_scope, self.config.alpha, self.config.beta)
        log.debug("%s -> %s: alpha %.2f beta %.2f, relative error %.5f", graph.source, ",".join(graph.targets),
                  result.alpha, result.beta, result.error)
        return flex_scales(act, weight_absmax, result.alpha, result.beta)
