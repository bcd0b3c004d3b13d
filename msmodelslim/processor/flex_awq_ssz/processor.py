"""`flex_awq_ssz` and `awq`: activation-aware scaling (AWQ, Lin et al., MLSys 2024) searched per subgraph
against the deployed quantizer's error (search.py), folded like SmoothQuant into the producer of X.

- `awq`: s = mean|X|^α, α ∈ {0, 1/n, …, (n−1)/n}, weight-only error; α = 0 (no scaling) is a candidate,
  so on the sampled tokens it never does worse than not scaling.
- `flex_awq_ssz`: s = mean|X|^α / mean|Ŵ|^β with the two-stage search of flex_smooth_quant (α with
  β = 1 − α, then β), scored with the activation quantizer too, so it also suits W4A8.

Candidates are ranked with round-to-nearest at the real bits/group size; when the real method is ssz the best
RESCORE candidates are quantized again with ssz and the lowest real error wins (ssz on every candidate would
cost ~40 ssz runs per subgraph). The search uses SEARCH_TOKENS token rows sampled evenly over the calibration
forward; the means use all tokens.

    - type: flex_awq_ssz
      qconfig: {act: {dtype: int8, scope: per_token}, weight: {dtype: int4, scope: per_channel, method: ssz}}
    - type: awq
      weight_qconfig: {dtype: int4, scope: per_group, method: minmax, ext: {group_size: 64}}
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.logging import get_logger
from msmodelslim.model.interface import SmoothSubgraph
from msmodelslim.processor.base import register_processor
from msmodelslim.processor.flex_awq_ssz.search import awq_scales, best_candidate, weight_mean
from msmodelslim.processor.flex_smooth_quant.search import two_stage_search
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats, SubgraphSmoother
from msmodelslim.quantizer.error import scaled_output_error
from msmodelslim.quantizer.scheme import QConfig

SEARCH_TOKENS = 512
RESCORE = 4
log = get_logger("flex_awq_ssz")


class _ActivationAwareSmoother(SubgraphSmoother):
    keep_samples = True

    def __init__(self, config, context, act_spec: QConfig, weight_spec: QConfig) -> None:
        super().__init__(config, context)
        self.act_spec, self.weight_spec = act_spec, weight_spec
        # Round to nearest at the same bits / scope / group size: ranks every candidate cheaply.
        self.proxy_spec = weight_spec.model_copy(update={"method": "minmax", "ext": {
            k: v for k, v in weight_spec.ext.items() if k == "group_size"}})

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        raise NotImplementedError

    def scales(self, graph: SmoothSubgraph, stats: InputStats, targets: list[nn.Linear]) -> torch.Tensor:
        weights = [t.weight for t in targets]
        act, w_mean = stats.abs_mean, weight_mean(weights, self.weight_spec.group_size)
        expand = lambda s: s  # noqa: E731 - source space equals target space except for "ov"
        if graph.kind == "ov":
            shape = self.context.attention
            act, w_mean = smooth.to_kv_channels(act, shape), smooth.to_kv_channels(w_mean, shape)
            expand = lambda s: smooth.from_kv_channels(s, shape)  # noqa: E731
        x = stats.samples(SEARCH_TOKENS)
        weight = torch.cat([w.detach().float() for w in weights])
        reference = x @ weight.T
        def cost_with(spec: QConfig):
            return lambda a, b: scaled_output_error(x, weight, expand(awq_scales(act, w_mean, a, b)), spec,
                                                    self.act_spec, reference)

        scored = self.candidates(cost_with(self.proxy_spec))
        rescore = None if self.weight_spec.method == "minmax" else cost_with(self.weight_spec)
        (alpha, beta), error = best_candidate(scored, rescore, RESCORE)
        log.debug("%s -> %s: alpha %.2f beta %.2f, relative output error %.5f (unscaled %.5f)", graph.source,
                  ",".join(graph.targets), alpha, beta, error, scored.get((0.0, 0.0), float("nan")))
        return awq_scales(act, w_mean, alpha, beta)


@register_processor("flex_awq_ssz")
class FlexAwqSszProcessor(_ActivationAwareSmoother):
    type_name = "flex_awq_ssz"

    def __init__(self, config, context) -> None:
        super().__init__(config, context, config.qconfig.act, config.qconfig.weight)

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        return two_stage_search(cost, self.config.alpha, self.config.beta)[1]


@register_processor("awq")
class AwqProcessor(_ActivationAwareSmoother):
    type_name = "awq"

    def __init__(self, config, context) -> None:
        weight_only = QConfig(dtype="float", scope="per_tensor", symmetric=True, method="none")
        super().__init__(config, context, weight_only, config.weight_qconfig)

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        return {(a, 0.0): cost(a, 0.0) for a in (i / self.config.n_grid for i in range(self.config.n_grid))}
