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
- MX (W4A16_MXFP4, W4A4_MXFP4, W8A8_MXFP8): the library's MXFP4A16 / MXFP4 / MXFP8 presets (float, group 32,
  `scale_dtype` uint8), formats `mxfp4-pack-quantized` (`weight_packed` uint8 [N, K/2], packed as NVFP4's) and
  `mxfp8-quantized` (`weight` float8_e4m3fn [N, K]); `weight_scale` uint8 [N, K/32] holds the E8M0 byte e + 127
  of each block's power-of-two scale, whatever rule chose e (OCP minmax, mse_round, ceil_x, GPTQ); W = q · 2^e.
  Activations (W4A4, W8A8) are quantized per block of 32 at run time (`dynamic: true`); nothing is stored for them.
- Asymmetric: `weight_zero_point` (int8 for int-quantized, int32 packed along N for pack-quantized),
  `input_zero_point` int8. Symmetric layers carry no zero points.
Both conventions dequantize as (q − zp)·s, the same as ascendv1's (q − offset)·s.
"""
from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.quant_scheme import MXFP4, MXFP4A16, MXFP8

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.float_formats import pack_fp4_pairs, scale_to_e8m0
from msmodelslim.quantizer.scheme import Scheme

INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
PACK_QUANTIZED = "pack-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
MXFP8_QUANTIZED = "mxfp8-quantized"
# Our MX schemes as the library's presets: (preset, format). W4A8_MXFP (MXFP4 weights, MXFP8 activations) has no
# preset: the library's MXFP4xFP8 quantizes activations to FP8 per group of 128 with float scales, not MXFP8.
MX_PRESETS = {Scheme.W4A16_MXFP4: (MXFP4A16, MXFP4_PACK_QUANTIZED), Scheme.W4A4_MXFP4: (MXFP4, MXFP4_PACK_QUANTIZED),
              Scheme.W8A8_MXFP8: (MXFP8, MXFP8_QUANTIZED)}


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
    if module.scheme in MX_PRESETS:
        preset, fmt = MX_PRESETS[module.scheme]
        act = preset.get("input_activations")
        return preset["weights"].model_copy(), act and act.model_copy(), fmt
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
    if fmt in (MXFP4_PACK_QUANTIZED, MXFP8_QUANTIZED):  # E8M0 bytes; float8 codes stored as they are
        codes = pack_fp4_pairs(module.qweight) if fmt == MXFP4_PACK_QUANTIZED else module.qweight
        out = {"weight_packed" if fmt == MXFP4_PACK_QUANTIZED else "weight": codes,
               "weight_scale": scale_to_e8m0(module.weight_scale)}
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
