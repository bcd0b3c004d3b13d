"""`flex_awq_ssz` and `awq`: activation-aware scaling (AWQ, Lin et al., MLSys 2024) searched per subgraph
against the deployed quantizer's error (search.py), folded like SmoothQuant into the producer of X.

- `awq`: s = mean|X|^α, α ∈ {0, 1/n, …, (n−1)/n}, weight-only error; α = 0 (no scaling) is a candidate,
  so on the sampled tokens it never does worse than not scaling.
- `flex_awq_ssz`: s = mean|X|^α / mean|Ŵ|^β with the two-stage search of flex_smooth_quant (α with
  β = 1 − α, then β), scored with the activation quantizer too, so it also suits W4A8. Each target is scored
  with the scheme the later steps of spec.process give it (smooth_quant/scoring.py; targets that stay float,
  such as routers, are not scored); `qconfig` is what is assumed when no later step quantizes.

Candidates are ranked with round-to-nearest at the real bits/group size; when a target's real method is ssz the
best RESCORE candidates are quantized again with ssz and the lowest real error wins (ssz on every candidate would
cost ~40 ssz runs per subgraph). The search uses SEARCH_TOKENS token rows sampled evenly over the calibration
forward; the means use all tokens.

    - type: flex_awq_ssz
      qconfig: {act: {dtype: int8, scope: per_token}, weight: {dtype: int4, scope: per_channel, method: ssz}}
    - type: awq
      weight_qconfig: {dtype: int4, scope: per_group, method: minmax, ext: {group_size: 64}}
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.logging import get_logger
from msmodelslim.processor.base import register_processor
from msmodelslim.processor.flex_awq_ssz.search import awq_scales, best_candidate, weight_mean
from msmodelslim.processor.flex_smooth_quant.search import two_stage_search
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.processor.smooth_quant.base import InputStats
from msmodelslim.processor.smooth_quant.scoring import OutputError, ScoredSmoother
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph
from msmodelslim.quantizer.scheme import LinearQConfig

SEARCH_TOKENS = 512
RESCORE = 4
log = get_logger("flex_awq_ssz")


class _ActivationAwareSmoother(ScoredSmoother):
    keep_mean = True  # the scales start from mean |X_j|

    def __init__(self, config, context, assumed: LinearQConfig) -> None:
        super().__init__(config, context)
        self.assumed = assumed
        self.group_size = assumed.weight.group_size  # Ŵ is normalised per group of this size (per row if None)

    def assumed_qconfig(self, name: str) -> Optional[LinearQConfig]:
        return self.assumed

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        raise NotImplementedError

    def scales(self, graph: BlockSubgraph, stats: InputStats, targets: list[nn.Module],
               names: list[str]) -> Optional[torch.Tensor]:
        scored = self.scored_targets(names, targets)
        if not scored:
            return None
        act, w_mean = stats.abs_mean, weight_mean([t.weight for t in targets], self.group_size)
        expand = lambda s: s  # noqa: E731 - source space equals target space except for "ov"
        if graph.kind == "ov":
            shape = self.ov_shape(graph)
            act, w_mean = smooth.to_kv_channels(act, shape), smooth.to_kv_channels(w_mean, shape)
            expand = lambda s: smooth.from_kv_channels(s, shape)  # noqa: E731
        error = OutputError(stats.samples(SEARCH_TOKENS), scored)

        def cost_with(real_method: bool):
            return lambda a, b: error(expand(awq_scales(act, w_mean, a, b)), real_method)

        scored_candidates = self.candidates(cost_with(False))
        rescore = cost_with(True) if error.has_slow_method else None
        (alpha, beta), result = best_candidate(scored_candidates, rescore, RESCORE)
        log.debug("%s -> %s: alpha %.2f beta %.2f, relative output error %.5f (unscaled %.5f)", graph.source,
                  ",".join(graph.targets), alpha, beta, result, scored_candidates.get((0.0, 0.0), float("nan")))
        return awq_scales(act, w_mean, alpha, beta)


@register_processor("flex_awq_ssz")
class FlexAwqSszProcessor(_ActivationAwareSmoother):
    type_name = "flex_awq_ssz"

    def __init__(self, config, context) -> None:
        super().__init__(config, context, config.qconfig)
        self._told = False

    def check_subgraph(self, block_name: str, graph: BlockSubgraph, targets: list[nn.Module]) -> None:
        """Say once when the later steps give a target another scheme than `qconfig`: they decide."""
        if self._told or not self.context.following:
            return
        for name, module in zip(graph.targets, targets):
            real = self.context.scheme_of(f"{block_name}.{name}") if isinstance(module, nn.Linear) else None
            if real is not None and real != self.config.qconfig:
                log.warning("flex_awq_ssz: a later step gives %s.%s %s (weight %s %s), not the qconfig of "
                            "flex_awq_ssz; the search scores every layer with the scheme the later steps give it",
                            block_name, name, real.scheme.value, real.weight.dtype.value, real.weight.method)
                self._told = True
                return

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        return two_stage_search(cost, self.config.alpha, self.config.beta)[1]


@register_processor("awq")
class AwqProcessor(_ActivationAwareSmoother):
    """Plain AWQ scores the weight-only error of `weight_qconfig` on every linear target, whatever follows."""

    type_name = "awq"

    def __init__(self, config, context) -> None:
        super().__init__(config, context, LinearQConfig(weight=config.weight_qconfig))

    def scoring_qconfig(self, name: str) -> Optional[LinearQConfig]:
        return self.assumed

    def candidates(self, cost) -> dict[tuple[float, float], float]:
        return {(a, 0.0): cost(a, 0.0) for a in (i / self.config.n_grid for i in range(self.config.n_grid))}
