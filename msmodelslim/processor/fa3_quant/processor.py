"""`fa3_quant`: the attention kernel's Q, K and V in int8 with one static scale per head (FA3 attention
quantization of vLLM-Ascend, formats.md A.6; the per-head int8 attention of SageAttention, Zhang et al. 2024,
studies the same granularity). Calibration is minmax:

    s_h = max(|min_h|, |max_h|) / 127 over every calibration token of head h,   offset_h = 0

During the block's calibration forward the adapter's rewiring (model/fa3.py) passes Q, K, V through observers
placed as the attention's children fa_q/fa_k/fa_v, after RoPE, right where the kernel reads them (MLA: in the
absorbed latent space, K/V one shared head); afterwards they become `FA3HeadQuant` (ir/fa3.py), so the block's
later forwards, and the steps after this one, see the quantized attention. dp_layer_wise: the ranks all-reduce
min and max per head, so every rank, and the output, equal a single process's.

    - type: fa3_quant
      qconfig: {dtype: int8, scope: per_head, symmetric: true, method: minmax}   # the default
      include: ["*"]                                                            # attention modules

scope per_token (dynamic int8) calibrates nothing: it writes the per-attention `quant_type` "INT8_DYNAMIC" only,
as the established tool does; vLLM-Ascend reads no FA setting without saved scales (formats.md A.6), so the
served (and evaluated) attention stays float.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.ir.fa3 import BRANCHES, FA3HeadQuant, FA3Observer
from msmodelslim.model.fa3 import Layout, install_fa3, mla_layout
from msmodelslim.model.kv_cache import cache_argument
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.matching import select, unused_patterns

log = get_logger("fa3_quant")

FA_QUANT_TYPE = "FAKQuant"  # the description's global key when static per-head scales are saved


def quant_type_string(config: FA3QuantConfig) -> str:
    """The per-attention `quant_type` (protocol.md §4.3): branches Q, K, V; those sharing (dtype, strategy) merge,
    a setting shared by all three drops the prefix; `_DYNAMIC` for per_token."""
    def token(q) -> str:
        return q.dtype.upper().replace("FP8_E4M3", "FP8") + ("" if q.static else "_DYNAMIC")

    tokens = [(letter, token(q)) for letter, q in zip("QKV", config.branches.values())]
    if len({t for _, t in tokens}) == 1:
        return tokens[0][1]
    groups: list[tuple[str, str]] = []
    for letter, t in tokens:
        if groups and groups[-1][1] == t:
            groups[-1] = (groups[-1][0] + letter, t)
        else:
            groups.append((letter, t))
    return "_".join(f"{letters}_{t}" for letters, t in groups)


@register_processor("fa3_quant")
class FA3QuantProcessor(Processor):
    def __init__(self, config: FA3QuantConfig, context: ProcessorContext = ProcessorContext()) -> None:
        self.config = config
        self.layout: Layout
        self.decoder_layer = context.structure.is_decoder_layer  # a VLM's vision tower has no KV cache
        if context.mla is not None:
            self.layout, self.attention = "mla", "self_attn"
            self.heads = {"fa_q": context.mla.num_heads, "fa_k": 1, "fa_v": 1}
        elif context.structure.kv_cache is not None and context.attention is not None:
            self.layout, self.attention = "gqa", context.structure.kv_cache.attention
            self.heads = {"fa_q": context.attention.num_heads, "fa_k": context.attention.num_kv_heads,
                          "fa_v": context.attention.num_kv_heads}
        else:
            raise UnsupportedError(f"fa3_quant is not supported yet for adapter {context.adapter_name}: it describes "
                                   f"no attention FA3 can rewire (ModelStructure.kv_cache with the attention shape, "
                                   f"or multi-head latent attention), which belongs to the attention and KV-cache "
                                   f"quantization work; remove fa3_quant from spec.process")
        self.quant_type = quant_type_string(config)
        self._names: list[str] = []  # every selected attention, for the description's quant_type entries
        self._observers: dict[str, dict[str, FA3Observer]] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.config.static

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # attention activations, not linears

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: every block has the attention, MLA's has the absorbed attention's parts, and its
        forward takes a cache (MLA's latent K/V are taken there). Patterns that select nothing are warned about."""
        block_names = [b for b in block_names if self.decoder_layer(b)]
        names = []
        for block_name in block_names:
            name = f"{block_name}.{self.attention}"
            try:
                attention = model.get_submodule(name)
            except AttributeError:
                raise UnsupportedError(f"fa3_quant: {block_name} has no attention module {self.attention!r}") from None
            if self.layout == "mla" and not mla_layout(attention):
                raise UnsupportedError(f"fa3_quant: {name} ({type(attention).__name__}) lacks kv_b_proj/kv_lora_rank/"
                                       f"qk_nope_head_dim/v_head_dim, so its absorbed latent attention is unknown")
            if self.layout == "mla" and cache_argument(attention) is None:
                raise UnsupportedError(f"fa3_quant: {type(attention).__name__}.forward of {name} takes no cache "
                                       f"argument, so its latent K/V cannot be observed")
            if getattr(attention, "config", None) is None:
                raise UnsupportedError(f"fa3_quant: {name} ({type(attention).__name__}) has no config selecting its "
                                       f"attention kernel, so Q/K/V cannot be routed through FA3")
            names.append(name)
        for pattern in unused_patterns(names, self.config.include + self.config.exclude):
            log.warning("fa3_quant: pattern %r matches no attention module (names look like %s)", pattern, names[0])
        self._names = select(names, self.config.include, self.config.exclude)

    def _attentions(self, block_name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
        if not self.decoder_layer(block_name):
            return []
        name = f"{block_name}.{self.attention}"
        if not select([name], self.config.include, self.config.exclude):
            return []
        return [(name, block.get_submodule(self.attention))]

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        if not self.config.static:
            return
        for name, attention in self._attentions(block_name, block):
            if isinstance(getattr(attention, "fa_q", None), (FA3HeadQuant, FA3Observer)):
                raise ProcessingError(f"{name}: its Q/K/V are already quantized by an earlier fa3_quant step; select "
                                      f"each attention in one fa3_quant step only")
            observers = self._observers[name] = {b: FA3Observer() for b in BRANCHES}
            install_fa3(attention, self.layout, observers)

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # per-head min/max merge exactly

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for name in sorted(self._observers):  # the same order on every rank
            for branch in BRANCHES:
                self._observers[name][branch].range.merge(collective, self.heads[branch])

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        if not self.config.static:
            return
        for name, attention in self._attentions(block_name, block):
            observers = self._observers.pop(name)
            if not all(o.range.seen for o in observers.values()):
                raise ProcessingError(f"{name}: the calibration forward did not pass Q/K/V through the attention "
                                      f"kernel, so its FA3 scales are unknown")
            quants = {b: FA3HeadQuant(*observers[b].range.qparams()) for b in BRANCHES}
            for branch, quant in quants.items():
                if quant.heads != self.heads[branch]:
                    raise ProcessingError(f"{name}.{branch}: {quant.heads} heads observed, {self.heads[branch]} "
                                          f"expected from the model config")
            install_fa3(attention, self.layout, quants)
            log.debug("%s: FA3 scale max q %.4g k %.4g v %.4g", name,
                      *(float(quants[b].scale.max()) for b in BRANCHES))

    def output_edits(self) -> OutputEdits:
        """`<attn>.quant_type` for every selected attention (static: the writer adds `fa_quant_type` with the
        scales it saves)."""
        return OutputEdits(description={f"{name}.quant_type": self.quant_type for name in self._names})
