"""What the KV-cache processors (`dynamic_cache`, `kv_smooth`) share: the family's KV-cache description or a
refusal that names why there is none, and the attention modules of a block that their include/exclude select.

include/exclude match attention module names (`model.layers.3.self_attn`); an empty include means all.
"""
from __future__ import annotations

from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.kv_cache import KvCacheStructure, cache_argument
from msmodelslim.processor.base import ProcessorContext
from msmodelslim.processor.matching import select, unused_patterns

log = get_logger("kv_cache")

MLA_REASON = (
    "this model uses multi-head latent attention (MLA). vLLM-Ascend caches MLA's compressed latent (kv_lora_rank "
    "values after kv_a_layernorm) and its shared RoPE key, not per-head K and V, and reads the C8 tensors "
    "(<attn>.k_proj/v_proj.kv_cache_scale) for dense attention only; MLA's int8 cache is the FA3 path: use "
    "fa3_quant (the engine's MLA int8 cache reads its fa_k scale) instead of this step for MLA models"
)


def kv_cache_structure(processor: str, context: ProcessorContext) -> KvCacheStructure:
    """The family's KV-cache description; an UnsupportedError naming the reason when it has none (raised
    while the pipeline is built, before any weight is read)."""
    if context.structure.kv_cache is not None:
        return context.structure.kv_cache
    if getattr(context, "mla", None) is not None:
        raise UnsupportedError(f"{processor} on {context.adapter_name}: {MLA_REASON}")
    raise UnsupportedError(f"{processor} is not supported yet for adapter {context.adapter_name}: it describes no "
                           f"KV cache (ModelStructure.kv_cache: the attention that writes K/V into the cache), which "
                           f"belongs to the attention and KV-cache quantization work; remove {processor} from "
                           f"spec.process")


def selected_attentions(structure: KvCacheStructure, block_name: str, block: nn.Module, include: list[str],
                        exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """(full name, module) of the block's attention when the patterns select it."""
    name = f"{block_name}.{structure.attention}"
    if not select([name], include or ["*"], exclude):
        return []
    return [(name, block.get_submodule(structure.attention))]


def check_attentions(processor: str, structure: KvCacheStructure, model: nn.Module, block_names: list[str],
                     include: list[str], exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """On the empty model: every block has the described attention and its forward takes a cache (else K/V
    cannot be observed); patterns that select no attention are warned about. Returns the selected ones."""
    names = []
    for block_name in block_names:
        block = model.get_submodule(block_name)
        try:
            attention = block.get_submodule(structure.attention)
        except AttributeError:
            raise UnsupportedError(f"{processor}: {block_name} has no module {structure.attention!r} "
                                   f"(ModelStructure.kv_cache.attention)") from None
        if cache_argument(attention) is None:
            raise UnsupportedError(f"{processor}: {type(attention).__name__}.forward of {block_name}."
                                   f"{structure.attention} takes no cache argument, so the K/V it writes into "
                                   f"the cache cannot be observed")
        names.append(f"{block_name}.{structure.attention}")
    for pattern in unused_patterns(names, include + exclude):
        log.warning("%s: pattern %r matches no attention module (names look like %s)", processor, pattern, names[0])
    return [(n, model.get_submodule(n)) for n in select(names, include or ["*"], exclude)]
