"""`fa3_quant` on a diffusion transformer: the attention kernel's Q, K and V quantized as on the text models
(processor/fa3_quant/processor.py: the same config, `quant_type` strings and branch modules), at the DiT attention
modules its family describes (model/diffusion/attention.py routes Q/K/V through fa_q/fa_k/fa_v right before the
kernel: after the q/k norms, RoPE and any online rotation).

- int8 per_head (static): observers record each head's range during the block's calibration forward, then
  FA3HeadQuant with s_h = max(|min_h|, |max_h|) / 127 (saved `<attn>.fa_{q,k,v}.scale/offset`, tag FAQuant);
- dynamic branches (fp8_e4m3 per_token, mxfp8/mxfp4 per_block): FA3DynamicQuant quantizes at run time (nothing
  saved but `<attn>.quant_type`); int8 per_token writes the string alone and stays float, as on the text models.
Every DiT attention has as many key/value heads as query heads (no GQA); MX branches need head_dim % 32 == 0.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.ir.fa3 import BRANCHES, FA3HeadQuant, FA3Observer
from msmodelslim.model.diffusion.attention import DitAttentionLayout, set_slot
from msmodelslim.processor.base import Processor
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.fa3_quant.processor import dynamic_float_branches, quant_type_string
from msmodelslim.quantizer.float_formats import MX_BLOCK

log = get_logger("fa3_quant")


class DitFA3Processor(Processor):
    def __init__(self, config: FA3QuantConfig, layout: DitAttentionLayout) -> None:
        self.config = config
        self.layout = layout
        self.quant_type = quant_type_string(config)
        self._names: list[str] = []  # selected attentions, full names
        self._observers: dict[str, dict[str, FA3Observer]] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.config.static

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        names = []
        for name, attention in self.layout.tappable_attentions(model, block_names, "fa3_quant"):
            head_dim = self.layout.head_dim(attention)
            for branch, q in self.config.branches.items():
                if q.scope == "per_block" and head_dim % MX_BLOCK:
                    raise UnsupportedError(f"fa3_quant: {name}.{branch} is {q.dtype} per_block, but its heads are "
                                           f"{head_dim} wide, not a multiple of the MX block {MX_BLOCK}; use "
                                           f"fp8_e4m3 per_token for that branch")
            names.append(name)
        for pattern in self.layout.unused_patterns(names, self.config.include + self.config.exclude):
            log.warning("fa3_quant: pattern %r matches no attention module (names look like %s)", pattern, names[0])
        self._names = self.layout.select(names, self.config.include, self.config.exclude)

    def _attentions(self, block_name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{block_name}.{path}", block.get_submodule(path)) for path in self.layout.modules
                if f"{block_name}.{path}" in self._names]

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for name, attention in self._attentions(block_name, block):
            if getattr(attention, "fa_q", None) is not None:
                raise ProcessingError(f"{name}: its Q/K/V are already quantized by an earlier fa3_quant step; select "
                                      f"each attention in one fa3_quant step only")
            if self.config.static:
                self._observers[name] = {b: FA3Observer() for b in BRANCHES}
                for branch, observer in self._observers[name].items():
                    set_slot(attention, branch, observer)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for name, attention in self._attentions(block_name, block):
            if not self.config.static:
                for branch, module in dynamic_float_branches(self.config).items():
                    set_slot(attention, branch, module)
                continue
            observers = self._observers.pop(name)
            if not all(o.range.seen for o in observers.values()):
                raise ProcessingError(f"{name}: the calibration forward did not pass Q/K/V through the attention "
                                      f"kernel, so its FA3 scales are unknown")
            heads = getattr(attention, self.layout.heads)
            for branch, observer in observers.items():
                quant = FA3HeadQuant(*observer.range.qparams())
                if quant.heads != heads:
                    raise ProcessingError(f"{name}.{branch}: {quant.heads} heads observed, {heads} expected")
                set_slot(attention, branch, quant.to(observer.range.min.device))

    def data_parallel_refusal(self) -> Optional[str]:
        return None if not self.config.static else "the DiT's FA3 ranges are not merged across ranks"

    def output_edits(self) -> OutputEdits:
        return OutputEdits(description={f"{name}.quant_type": self.quant_type for name in self._names})
