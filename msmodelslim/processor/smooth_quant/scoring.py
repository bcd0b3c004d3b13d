"""What a searched smoothing scale is scored against: the quantization each target will really get.

flex_smooth_quant and flex_awq_ssz pick s per subgraph by the error of the quantized product. The targets of
one subgraph may get different schemes from the steps that follow (the MoE norm feeds routed experts
W4A8_DYNAMIC, shared experts W8A8_DYNAMIC and a float router), so a candidate s is scored over every target
that a later step quantizes, each with its own quantizers:

    err = √(Σ_t ‖Q_a,t(X/s) · Q_w,t(W_t·s)ᵀ − X·W_tᵀ‖²) / √(Σ_t ‖X·W_tᵀ‖²)

Targets that stay float (routers, linears no later rule selects) lose nothing to any s and are left out. When
no later step quantizes anything (a smoothing-only run), the processor's own assumption is used instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from msmodelslim.processor.smooth_quant.base import SubgraphSmoother
from msmodelslim.quantizer.activation import fake_quantize_act
from msmodelslim.quantizer.scheme import LinearQConfig, QConfig
from msmodelslim.quantizer.weight import fake_quantize_weight


def rounding_proxy(spec: QConfig) -> QConfig:
    """Round to nearest at the same bits, scope and group size: ranks many candidates cheaply (ssz on every
    candidate would cost ~40 ssz runs per subgraph; gptq needs a Hessian)."""
    return spec.model_copy(update={"method": "minmax", "ext": {k: v for k, v in spec.ext.items() if k == "group_size"}})


@dataclass(frozen=True)
class ScoredTarget:
    """One target a later step quantizes: its float weight and the quantizers it will get."""

    name: str
    weight: torch.Tensor  # float32 [out, in]
    qconfig: LinearQConfig

    @property
    def proxy(self) -> QConfig:
        return rounding_proxy(self.qconfig.weight)


CHUNK_ROWS = 8192  # output rows quantized and multiplied at once (bounds the memory of the many-expert case)


class OutputError:
    """The error above for one input sample `x` [tokens, in] and its scored targets. Targets with the same
    qconfig are quantized and multiplied together, in chunks of at most CHUNK_ROWS rows (per-row weight
    quantization does not care how rows are grouped); the float products X·Wᵀ are computed once."""

    def __init__(self, x: torch.Tensor, targets: list[ScoredTarget]) -> None:
        self.x = x
        by_scheme: dict[str, list[ScoredTarget]] = {}
        for target in targets:
            by_scheme.setdefault(target.qconfig.model_dump_json(), []).append(target)
        self.chunks: list[list[ScoredTarget]] = []
        for same in by_scheme.values():
            chunk, rows = [], 0
            for target in same:
                if chunk and rows + len(target.weight) > CHUNK_ROWS:
                    self.chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(target)
                rows += len(target.weight)
            self.chunks.append(chunk)
        self.references = [x @ self._weight(chunk).T for chunk in self.chunks]
        self.total = math.sqrt(sum(float(r.pow(2).sum()) for r in self.references))

    @staticmethod
    def _weight(chunk: list[ScoredTarget]) -> torch.Tensor:
        return chunk[0].weight if len(chunk) == 1 else torch.cat([t.weight for t in chunk])

    def __call__(self, s: torch.Tensor, real_weight_method: bool = False) -> float:
        """Relative error with scale s (in the targets' input space); weights rounded to nearest at their real
        bits, or (`real_weight_method`) quantized by their real method (minmax and ssz; others rounded)."""
        quantized_x: dict[str, torch.Tensor] = {}  # one activation quantization per distinct act scheme
        error2 = 0.0
        for chunk, reference in zip(self.chunks, self.references):
            qconfig = chunk[0].qconfig
            key = qconfig.act.model_dump_json()
            if key not in quantized_x:
                quantized_x[key] = fake_quantize_act(self.x / s, qconfig.act)
            spec = qconfig.weight if real_weight_method and qconfig.weight.method in ("minmax", "ssz") \
                else chunk[0].proxy
            out = quantized_x[key] @ fake_quantize_weight(self._weight(chunk) * s, spec).T
            error2 += float((out - reference).pow(2).sum())
        return math.sqrt(error2) / max(self.total, 1e-12)

    @property
    def has_slow_method(self) -> bool:
        """Whether scoring with the real methods differs from the proxy (a target quantized by ssz)."""
        return any(chunk[0].qconfig.weight.method == "ssz" for chunk in self.chunks)


class ScoredSmoother(SubgraphSmoother):
    """A smoother that searches s against the quantization its targets will get (`scored_targets`)."""

    keep_samples = True

    def assumed_qconfig(self, name: str) -> Optional[LinearQConfig]:
        """The scheme to score a linear target with when no later step of spec.process quantizes anything."""
        raise NotImplementedError

    def scoring_qconfig(self, name: str) -> Optional[LinearQConfig]:
        """What target `name` will get: a later step's qconfig (None: it stays float and is not scored); in a
        run where no later step quantizes, the processor's assumption."""
        if self.context.following:
            return self.context.scheme_of(name)
        return self.assumed_qconfig(name)

    def scored_targets(self, names: list[str], targets: list[nn.Module]) -> list[ScoredTarget]:
        scored = []
        for name, module in zip(names, targets):
            qconfig = self.scoring_qconfig(name) if isinstance(module, nn.Linear) else None  # routers stay float
            if qconfig is not None:
                scored.append(ScoredTarget(name, module.weight.detach().float(), qconfig))
        return scored
