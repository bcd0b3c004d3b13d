"""One QuantLinear in the compressed-tensors layout (formats.md B.2-B.5), built with the library's own
QuantizationArgs and int32 packing.

- Activations quantized (W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC): format `int-quantized`; `weight` int8 codes
  (int4 codes stay one per int8), `weight_scale` float32 [N, G], `input_scale`/`input_zero_point` [1] for
  static.
- Weight-only (W8A16, W4A16): format `pack-quantized`; `weight_packed` int32 [N, K·b/32] (offset-binary,
  low bits first, along K), `weight_scale` [N, G], `weight_shape` [N, K].
- FP8 dynamic (W8A8FP8_DYNAMIC): format `float-quantized`; `weight` float8_e4m3fn [N, K], `weight_scale`
  float32 [N, 1], activations per token at run time (max|x|/448).
- NVFP4 weight-only (W4A16_NVFP4): format `nvfp4-pack-quantized` (the library's NVFP4A16 preset, vLLM's
  W4A16Fp4); `weight_packed` uint8 [N, K/2] (E2M1 codes, element 2j in the low nibble), `weight_scale`
  float8_e4m3fn [N, K/16], `weight_global_scale` float32 [1]; W = q · weight_scale / weight_global_scale.
- NVFP4 W4A4 (W4A4_NVFP4): the same, plus `input_global_scale` float32 [1] (448·6 / max|x| over the calibration
  inputs); the block scales of the input are computed at run time (`dynamic: local`), the library's NVFP4 preset.
- Asymmetric: `weight_zero_point` (int8 for int-quantized, int32 packed along N for pack-quantized),
  `input_zero_point` int8. Symmetric layers carry no zero points.
Both conventions dequantize as (q − zp)·s, the same as ascendv1's (q − offset)·s.
"""
from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.float_formats import pack_fp4_pairs
from msmodelslim.quantizer.scheme import Scheme

INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
PACK_QUANTIZED = "pack-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"


def _symmetric(offset: torch.Tensor | None) -> bool:
    return offset is None or bool((offset == 0).all())


def quantization_args(module: QuantLinear) -> tuple[QuantizationArgs, QuantizationArgs | None, str]:
    """(weights, input_activations, format) of this layer."""
    if module.scheme in (Scheme.W8A8_MIX, Scheme.W8A8S):  # planning refuses these before any weight is read
        raise UnsupportedError(f"{module.scheme.value} is an Ascend serving scheme with no compressed-tensors "
                               f"equivalent; quantize with act scope per_tensor or per_token and weight method "
                               f"minmax, ssz or gptq")
    if module.scheme == Scheme.W8A8FP8_DYNAMIC:  # vLLM's FP8_DYNAMIC preset: per-channel weights, per-token inputs
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", observer="minmax",
                                   scale_dtype=torch.float32)
        act = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True, observer=None)
        return weights, act, FLOAT_QUANTIZED
    if module.scheme in (Scheme.W4A16_NVFP4, Scheme.W4A4_NVFP4):  # the library's NVFP4A16 / NVFP4 presets
        weights = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                   dynamic=False, observer="minmax", scale_dtype=torch.float8_e4m3fn,
                                   zp_dtype=torch.float8_e4m3fn)
        act = None
        if module.scheme == Scheme.W4A4_NVFP4:  # block scales at run time under the stored input_global_scale
            act = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                   dynamic="local", observer="static_minmax", scale_dtype=torch.float8_e4m3fn,
                                   zp_dtype=torch.float8_e4m3fn)
        return weights, act, NVFP4_PACK_QUANTIZED
    if module.scheme.is_float_format:  # planning refuses these before any weight is read
        raise UnsupportedError(f"{module.scheme.value} has no compressed-tensors writer yet; save with ascendv1_saver")
    group = module.group_size
    weights = QuantizationArgs(num_bits=module.weight_bits, type="int", symmetric=_symmetric(module.weight_offset),
                               strategy="group" if group else "channel", group_size=group, observer="minmax",
                               scale_dtype=torch.float32)
    if module.scheme == Scheme.W8A8:
        act = QuantizationArgs(num_bits=8, type="int", symmetric=_symmetric(module.input_offset), strategy="tensor",
                               dynamic=False, observer="minmax", scale_dtype=torch.float32)
    elif module.scheme in (Scheme.W8A8_DYNAMIC, Scheme.W4A8_DYNAMIC):
        act = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True, observer=None)
    else:
        act = None
    return weights, act, INT_QUANTIZED if act is not None else PACK_QUANTIZED


def linear_tensors(module: QuantLinear, bias_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one layer. Scales stay float32 and say so (`scale_dtype`): rounding them to a bf16
    model's dtype, as llm-compressor does, would move every dequantized weight."""
    weights, act, fmt = quantization_args(module)
    if fmt == NVFP4_PACK_QUANTIZED:
        out = {"weight_packed": pack_fp4_pairs(module.qweight),
               "weight_scale": module.weight_scale.to(torch.float8_e4m3fn),  # E4M3 values: exact
               "weight_global_scale": module.weight_global_scale.float().reshape(1)}
        if module.input_global_scale is not None:
            out["input_global_scale"] = module.input_global_scale.float().reshape(1)
        if module.bias is not None:
            out["bias"] = module.bias.to(bias_dtype)
        return out
    out: dict[str, torch.Tensor] = {"weight_scale": module.weight_scale.float()}
    zero_point = torch.round(module.weight_offset).to(torch.int8)
    if fmt in (INT_QUANTIZED, FLOAT_QUANTIZED):  # float8 codes are stored as they are
        out["weight"] = module.qweight
        if not weights.symmetric:
            out["weight_zero_point"] = zero_point
    else:
        out["weight_packed"] = pack_to_int32(module.qweight, weights.num_bits, packed_dim=1)
        out["weight_shape"] = torch.tensor(list(module.qweight.shape), dtype=torch.int64)
        if not weights.symmetric:
            out["weight_zero_point"] = pack_to_int32(zero_point, weights.num_bits, packed_dim=0)
    if act is not None and not act.dynamic:
        out["input_scale"] = module.input_scale.float().reshape(1)
        if not act.symmetric:
            out["input_zero_point"] = torch.round(module.input_offset).to(torch.int8).reshape(1)
    if module.bias is not None:
        out["bias"] = module.bias.to(bias_dtype)
    return out
