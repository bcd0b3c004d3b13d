"""vLLM's FP8 KV cache in compressed-tensors (formats.md B): `quantization_config.kv_cache_scheme` and one scale
per K and V tensor on the attention module, as llm-compressor writes them and vLLM loads them.

    kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}
    <attn>.k_scale   <attn>.v_scale      float32 [1]      (e.g. model.layers.3.self_attn.k_scale)

vLLM's compressed-tensors KV-cache method accepts only that scheme (8-bit float, strategy tensor, symmetric) and
maps `<attn>.k_scale` onto its attention layer; its cache write is e4m3(x / k_scale), its read q · k_scale. The
int8 per-channel cache of vLLM-Ascend (C8) has no compressed-tensors equivalent (vLLM reads no int8 KV cache),
so a C8 step is refused for this format; dynamic_cache with qconfig {dtype: fp8_e4m3, scope: per_tensor}
produces this one.

Transformers up to 5.17 with compressed-tensors 0.19 loads the scales and quantizes the cache when it reads such
a checkpoint; with transformers 5.24 and compressed-tensors 0.20 it leaves `k_scale`/`v_scale` unread (the
attention's cache argument was renamed `cache`, which compressed-tensors does not recognize). `load_with_kv_cache`
reads the checkpoint with transformers and installs the cache simulation itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from torch import nn

from msmodelslim.ir.kv_cache import FP8KVCacheQuant

SUFFIXES = ("k_scale", "v_scale")
# Why an int8 per-channel cache (C8) cannot be saved in this format (named before any weight is read).
C8_REASON = ("vLLM reads a compressed-tensors kv_cache_scheme only as FP8 E4M3 with one scale per tensor (k_scale/"
             "v_scale); there is no int8 per-channel KV cache (C8) in this format or on GPUs. Save with "
             "ascendv1_saver, or write dynamic_cache with qconfig {dtype: fp8_e4m3, scope: per_tensor, "
             "symmetric: true, method: minmax} for vLLM's FP8 cache")


def kv_cache_scheme() -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True,
                            observer="minmax", scale_dtype=torch.float32)


def is_vllm_fp8_cache(scheme: QuantizationArgs) -> bool:
    """The only kv_cache_scheme vLLM loads: float 8-bit, one scale per tensor, symmetric."""
    return scheme.type == "float" and scheme.num_bits == 8 and scheme.strategy == "tensor" and scheme.symmetric


def kv_cache_tensors(attention: str, quant: FP8KVCacheQuant) -> dict[str, torch.Tensor]:
    """{`<attn>.k_scale`: [1], `<attn>.v_scale`: [1]}, float32."""
    return {f"{attention}.k_scale": quant.key_scale.float().reshape(1).contiguous(),
            f"{attention}.v_scale": quant.value_scale.float().reshape(1).contiguous()}


def load_with_kv_cache(path: Path) -> nn.Module:
    """A compressed-tensors checkpoint read by transformers, with its FP8 KV cache (if it has one) simulated as
    vLLM runs it: K/V quantized on their way into the cache, read back times the scale."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from msmodelslim.model.kv_cache import install_kv_cache_quant

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    config = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if config.get("kv_cache_scheme") is None:
        return model
    scales: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            scales.update({k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[-1] in SUFFIXES})
    attentions = sorted({k.rsplit(".", 1)[0] for k in scales})
    if not attentions:
        raise ValueError(f"{path}: config.json has a kv_cache_scheme but no <attn>.k_scale tensor is saved")
    for attention in attentions:
        install_kv_cache_quant(model.get_submodule(attention),
                               FP8KVCacheQuant(scales[f"{attention}.k_scale"], scales[f"{attention}.v_scale"]))
    return model
