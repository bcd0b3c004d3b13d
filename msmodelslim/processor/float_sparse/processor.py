"""`float_sparse`: prune the float weights of the selected linears with ADMM (quantizer/admm.py) on their
calibration inputs, round the survivors to a short float16 mantissa (quantizer/mantissa.py), and replace each
linear with a `SparseFloatLinear` (ascendv1 `W16A16S`).

```yaml
- type: float_sparse
  sparse_ratio: 0.3     # share of each layer's weights set to zero (one threshold per layer)
  include: []           # empty: every linear of the decoder layers
  exclude: []
```

Each selected linear collects H = XᵀX of its inputs during the block's calibration forward (linears fed by the
same tensor, q/k/v and gate/up, share one product). A routed MoE expert that received no token has no H: it is
pruned by magnitude instead, with a log line, as linear_quant falls back for such experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.sparse_linear import SparseFloatLinear
from msmodelslim.model.moe import routed_expert_linears
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.float_sparse.config import FloatSparseConfig
from msmodelslim.processor.matching import select
from msmodelslim.quantizer.admm import accumulate_gram, admm_prune, magnitude_prune
from msmodelslim.quantizer.mantissa import keep_mask, round_mantissa

log = get_logger("float_sparse")


@dataclass
class GramRecord:
    gram: Optional[torch.Tensor] = None  # Σ XᵀX over the calibration tokens
    tokens: int = 0


@torch.no_grad()
def sparsify(weight: torch.Tensor, gram: Optional[torch.Tensor], ratio: float) -> torch.Tensor:
    """The W16A16S weight of one linear: ADMM pruning (magnitude pruning without inputs), then the mantissa
    rounding that keeps the 2 % of weights whose rounding would cost most."""
    weight = weight.detach().float()
    if gram is None:
        pruned = magnitude_prune(weight, ratio)
        importance = torch.ones(weight.shape[1], device=weight.device)
    else:
        pruned = admm_prune(weight, gram, ratio)
        importance = torch.diagonal(gram)
    return round_mantissa(pruned, keep_mask(pruned, importance))


@register_processor("float_sparse")
class FloatSparseProcessor(Processor):
    def __init__(self, config: FloatSparseConfig, context: ProcessorContext | None = None) -> None:
        self.config = config
        self._records: dict[str, GramRecord] = {}
        self._hooks: list = []
        self._last: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (input, its XᵀX) for sibling linears

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        include, exclude = self.config.selection
        rule = f"float_sparse(include={self.config.include}, exclude={self.config.exclude})"
        return {n: rule for n in select(linear_names, include, exclude)}

    def _targets(self, block_name: str, block: nn.Module) -> list[str]:
        names = [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        return select(names, *self.config.selection)

    def _observe(self, record: GramRecord, x: torch.Tensor) -> None:
        if self._last is not None and self._last[0] is x:
            update = self._last[1]
        else:
            update = accumulate_gram(None, x)
            self._last = (x, update)
        record.gram = update.clone() if record.gram is None else record.gram.add_(update)
        record.tokens += x.numel() // x.shape[-1]

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for name in self._targets(block_name, block):
            record = self._records[name] = GramRecord()
            module = block.get_submodule(name[len(block_name) + 1 :])
            self._hooks.append(module.register_forward_pre_hook(lambda _m, args, r=record: self._observe(r, args[0])))

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._last = None
        experts = routed_expert_linears(block, block_name)
        for name in self._targets(block_name, block):
            relative = name[len(block_name) + 1 :]
            linear = block.get_submodule(relative)
            record = self._records.pop(name, GramRecord())
            if record.tokens == 0:
                if name not in experts:
                    raise ProcessingError(f"{name} received no calibration data, so float_sparse has no XᵀX to "
                                          f"prune it with")
                log.info("%s received no calibration tokens: pruned by magnitude instead of ADMM", name)
            weight = sparsify(linear.weight, record.gram if record.tokens else None, self.config.sparse_ratio)
            bias = None if linear.bias is None else linear.bias.detach().float()
            sparse = SparseFloatLinear(weight, bias)
            parent_name, _, child = relative.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, sparse)
            log.debug("%s: W16A16S, %.4f of the weights are zero", name, sparse.sparsity)
