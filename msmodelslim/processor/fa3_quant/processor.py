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

The dynamic scopes calibrate nothing and save no tensor: they write the per-attention `quant_type` string only
(protocol.md §4.3), e.g. "INT8_DYNAMIC", "FP8_DYNAMIC", "MXFP8_DYNAMIC", "Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC".
- int8 per_token: vLLM-Ascend reads no FA setting without saved scales (formats.md A.6), so the served (and
  evaluated) attention stays float, as before.
- fp8_e4m3 per_token, mxfp8 / mxfp4 per_block: the branch becomes `FA3DynamicQuant` (ir/fa3.py), which quantizes Q,
  K or V at run time as an FP8 / MX attention kernel does (quantizer/fa3.py), in this run's later forwards and in
  the reader (format/ascendv1/fa3.py rebuilds it from the string), so `msmodelslim eval` measures that kernel. Note
  that vLLM-Ascend does not consume dynamic FA types (formats.md A.6, inferred): there such a checkpoint serves
  float attention and the evaluated numbers are the kernel's, not vLLM-Ascend's.

    - type: fa3_quant
      details:
        fa_q: {dtype: fp8_e4m3, scope: per_token}
        fa_k: {dtype: mxfp4, scope: per_block}      # head_dim (MLA: kv_lora_rank and the rope dim) a multiple of 32
        fa_v: {dtype: mxfp4, scope: per_block}
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.fa3 import branch_token, join_quant_type
from msmodelslim.format.edits import OutputEdits
from msmodelslim.ir.fa3 import BRANCHES, FA3DynamicQuant, FA3HeadQuant, FA3Observer
from msmodelslim.model.fa3 import Layout, install_fa3, mla_layout
from msmodelslim.model.kv_cache import cache_argument
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.matching import select, unused_patterns
from msmodelslim.quantizer.float_formats import MX_BLOCK
from msmodelslim.quantizer.fa3 import DYNAMIC_FLOAT

log = get_logger("fa3_quant")

FA_QUANT_TYPE = "FAKQuant"  # the description's global key when static per-head scales are saved


def dynamic_float_branches(config: FA3QuantConfig) -> dict[str, nn.Module]:
    """{fa_q, fa_k, fa_v: module} when a branch is a dynamic floating-point one (the others, int8 per_token, stay
    nn.Identity: no kernel reads them), {} when none is."""
    branches = config.branches
    if not any((q.dtype, q.scope) in DYNAMIC_FLOAT for q in branches.values()):
        return {}
    return {b: FA3DynamicQuant(q.dtype, q.scope) if (q.dtype, q.scope) in DYNAMIC_FLOAT else nn.Identity()
            for b, q in branches.items()}


def quant_type_string(config: FA3QuantConfig) -> str:
    """The per-attention `quant_type` (protocol.md §4.3): branches Q, K, V; those sharing (dtype, strategy) merge,
    a setting shared by all three drops the prefix; `_DYNAMIC` for per_token / per_block."""
    return join_quant_type([branch_token(q.dtype, q.scope) for q in config.branches.values()])


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
            self._head_dim = context.attention.head_dim
        else:
            raise UnsupportedError(f"fa3_quant is not supported yet for adapter {context.adapter_name}: it describes "
                                   f"no attention FA3 can rewire (ModelStructure.kv_cache with the attention shape, "
                                   f"or multi-head latent attention), which belongs to the attention and KV-cache "
                                   f"quantization work; remove fa3_quant from spec.process")
        self.quant_type = quant_type_string(config)
        self.dynamic_float = bool(dynamic_float_branches(config))
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
        for name in self._names:
            self._check_mx_blocks(name, model.get_submodule(name))

    def _branch_dims(self, attention: nn.Module) -> dict[str, int]:
        """The last axis of each branch as the kernel reads it: head_dim; MLA: Q and K r + rope, V r (latent)."""
        if self.layout == "mla":
            rank, rope = attention.kv_lora_rank, attention.qk_rope_head_dim
            return {"fa_q": rank + rope, "fa_k": rank + rope, "fa_v": rank}
        dim = self._head_dim
        return {"fa_q": dim, "fa_k": dim, "fa_v": dim}

    def _check_mx_blocks(self, name: str, attention: nn.Module) -> None:
        """MX branches quantize blocks of 32 along the last axis: refuse (before any weight is read) a head size
        that is not a multiple of 32 (a partial block is no MX kernel's layout)."""
        dims = self._branch_dims(attention)
        size = ("kv_lora_rank + qk_rope_head_dim for Q and K, kv_lora_rank for V (MLA's latent)"
                if self.layout == "mla" else "head_dim")
        for branch, q in self.config.branches.items():
            if q.scope == "per_block" and dims[branch] % MX_BLOCK:
                raise UnsupportedError(f"fa3_quant: {name}.{branch} is {q.dtype} per_block, but the kernel reads "
                                       f"vectors of {dims[branch]} there ({size}), not a multiple of the MX block "
                                       f"{MX_BLOCK}; use fp8_e4m3 per_token for that branch")

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
            if isinstance(getattr(attention, "fa_q", None), (FA3HeadQuant, FA3Observer, FA3DynamicQuant)):
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
            self._install_dynamic(block_name, block)
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

    def _install_dynamic(self, block_name: str, block: nn.Module) -> None:
        """Dynamic floating-point branches: the attention quantizes Q/K/V at run time from now on (nothing
        calibrated); int8 per_token alone changes nothing."""
        if not self.dynamic_float:
            return
        for name, attention in self._attentions(block_name, block):
            if isinstance(getattr(attention, "fa_q", None), (FA3HeadQuant, FA3Observer, FA3DynamicQuant)):
                raise ProcessingError(f"{name}: its Q/K/V are already quantized by an earlier fa3_quant step; select "
                                      f"each attention in one fa3_quant step only")
            install_fa3(attention, self.layout, dynamic_float_branches(self.config))

    def output_edits(self) -> OutputEdits:
        """`<attn>.quant_type` for every selected attention (static: the writer adds `fa_quant_type` with the
        scales it saves)."""
        return OutputEdits(description={f"{name}.quant_type": self.quant_type for name in self._names})
