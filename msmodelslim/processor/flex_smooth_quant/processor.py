"""`flex_smooth_quant`: the established msModelSlim's Flex Smooth Quant, SmoothQuant (Xiao et al., ICML 2023)
with two exponents searched per subgraph against the error of the real quantized product.

    s_j = max|X_j|^α / max|W_j|^β

max|W_j| runs over every target (a MoE norm's router, routed and shared experts alike). Each candidate is
scored with the schemes the later steps of spec.process give the targets (smooth_quant/scoring.py: a static
W8A8 linear_quant scores static per-tensor activations, W4A8_DYNAMIC experts int4 weights with per-token
activations; weights rounded to nearest at their real bits), two stages as in search.py. A subgraph none of
whose targets a later step quantizes is left unscaled. In a smoothing-only run (nothing quantized later),
`act_scope` says what to assume: W8A8 with per_token (the default, with a warning) or per_tensor activations.

The search runs on up to SEARCH_TOKENS token rows sampled evenly from the calibration forward; the scale
itself uses the ranges of all tokens. For "ov", ranges are reduced (max) over the query heads sharing a
key/value head, so one scale serves each v_proj row (MLA: each kv_b_proj value row); the search scores o_proj.

    - type: flex_smooth_quant       # alpha/beta empty: searched
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger
from msmodelslim.processor.base import register_processor
from msmodelslim.processor.flex_smooth_quant.search import INT8_ACT, INT8_WEIGHT, flex_scales, two_stage_search
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats
from msmodelslim.processor.smooth_quant.scoring import OutputError, ScoredSmoother
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph
from msmodelslim.quantizer.scheme import LinearQConfig, QScope

SEARCH_TOKENS = 512
log = get_logger("flex_smooth_quant")


def act_scope_of(qconfig: LinearQConfig) -> Optional[str]:
    """The act_scope value that names this scheme's activation quantization (None for float activations)."""
    if qconfig.act.is_float:
        return None
    return "per_token" if qconfig.act.scope == QScope.per_token else "per_tensor"


@register_processor("flex_smooth_quant")
class FlexSmoothQuantProcessor(ScoredSmoother):
    type_name = "flex_smooth_quant"

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        if not context.following and config.act_scope is None:
            log.warning("flex_smooth_quant: no later step of spec.process quantizes, so the scales are scored as "
                        "W8A8_DYNAMIC (int8 per-token activations, int8 per-channel weights); set act_scope: "
                        "per_tensor if the model will get static activations")

    def assumed_qconfig(self, name: str) -> LinearQConfig:
        return LinearQConfig(act=INT8_ACT[self.config.act_scope or "per_token"], weight=INT8_WEIGHT)

    def check_subgraph(self, block_name: str, graph: BlockSubgraph, targets: list[nn.Module]) -> None:
        """A given act_scope must agree with what the later steps give the targets (it cannot override them)."""
        if self.config.act_scope is None or not self.context.following:
            return
        for name, module in zip(graph.targets, targets):
            qconfig = self.context.scheme_of(f"{block_name}.{name}") if isinstance(module, nn.Linear) else None
            if qconfig is not None and act_scope_of(qconfig) != self.config.act_scope:
                raise ConfigError(
                    f"flex_smooth_quant: act_scope {self.config.act_scope} contradicts the {qconfig.scheme.value} a "
                    f"later step gives {block_name}.{name}; remove act_scope (the search scores every layer with "
                    f"the scheme the following linear_quant gives it)")

    def scales(self, graph: BlockSubgraph, stats: InputStats, targets: list[nn.Module],
               names: list[str]) -> Optional[torch.Tensor]:
        scored = self.scored_targets(names, targets)
        if not scored:
            return None
        act, weight_absmax = stats.absmax, smooth.column_absmax([t.weight for t in targets])
        expand = lambda s: s  # noqa: E731 - source space equals target space except for "ov"
        if graph.kind == "ov":
            shape = self.ov_shape(graph)
            act, weight_absmax = smooth.to_kv_channels(act, shape), smooth.to_kv_channels(weight_absmax, shape)
            expand = lambda s: smooth.from_kv_channels(s, shape)  # noqa: E731
        error = OutputError(stats.samples(SEARCH_TOKENS), scored)
        result, _ = two_stage_search(lambda a, b: error(expand(flex_scales(act, weight_absmax, a, b))),
                                     self.config.alpha, self.config.beta)
        log.debug("%s -> %s: alpha %.2f beta %.2f, relative error %.5f (%s)", graph.source, ",".join(graph.targets),
                  result.alpha, result.beta, result.error,
                  ", ".join(sorted({t.qconfig.scheme.value for t in scored})))
        return flex_scales(act, weight_absmax, result.alpha, result.beta)
