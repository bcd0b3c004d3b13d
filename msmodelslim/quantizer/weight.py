"""One entry point for weight quantization by `QConfig.method`, as tensor functions."""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.dualscale import expand_dual, quantize_weight_dualscale
from msmodelslim.quantizer.float_formats import MX_BLOCK, code_values, quantize_weight_float
from msmodelslim.quantizer.fouroversix import fouroversix_exponent
from msmodelslim.quantizer.gptq import gptq_quantize, gptq_quantize_float, gptq_quantize_nvfp4
from msmodelslim.quantizer.lowbit_sparse import lowbit_sparse_quantize
from msmodelslim.quantizer.mx_methods import ceil_x_exponent, ceil_x_search, mse_round_exponent
from msmodelslim.quantizer.nvfp4 import NVFP4_BLOCK, effective_scale, quantize_weight_nvfp4
from msmodelslim.quantizer.primitives import dequantize_weight, quantize_weight_minmax
from msmodelslim.quantizer.scheme import QConfig
from msmodelslim.quantizer.ssz import ssz_quantize


def quantize_weight(w: torch.Tensor, spec: QConfig, hessian: Optional[torch.Tensor] = None):
    """(codes [out, in], scale [out, n_groups], offset [out, n_groups]); gptq needs the input Hessian. Codes are
    int8 for the integer dtypes, float8_e4m3fn for fp8_e4m3/mxfp8 and uint8 E2M1 codes for mxfp4."""
    if spec.method == "gptq" and hessian is None:
        raise ValueError("gptq needs the Hessian of the layer's calibration inputs")
    if spec.dtype.value == "nvfp4":  # the block and global scales as one per block of 16: s_b / g
        codes, block_scale, g = quantize_weight_with_global(w, spec, hessian)
        scale = effective_scale(block_scale, g)
        return codes, scale, torch.zeros_like(scale)
    if spec.method == "dualscale":  # the two scales as one per block of 32: 2^e · S_dual (exact in float32)
        codes, scale, s_dual = quantize_weight_dualscale(w, spec.ext["dual_block_size"])
        scale = scale * expand_dual(s_dual, w.shape[-1] // MX_BLOCK)
        return codes, scale, torch.zeros_like(scale)
    if spec.dtype.element is not None:  # fp8_e4m3 / mxfp8 / mxfp4: round to nearest on the float grid
        if spec.method == "gptq":
            return gptq_quantize_float(w, hessian, spec.dtype.value, spec.option("block_size"),
                                       spec.option("percdamp"), spec.option("act_order"))
        exponent = None  # the OCP shared exponent (minmax)
        if spec.method == "mse_round":
            exponent = mse_round_exponent(w)
        elif spec.method == "ceil_x":
            value = spec.option("ceil_x_value")
            if spec.option("enable_search"):
                value = ceil_x_search(w, spec.option("search_min"), spec.option("search_max"),
                                      spec.option("search_step"))
            exponent = ceil_x_exponent(w, value)
        elif spec.method == "fouroversix":
            exponent = fouroversix_exponent(w)
        return quantize_weight_float(w, spec.dtype.value, exponent)
    bits, group = spec.dtype.bits, spec.group_size
    if spec.method == "ssz":
        return ssz_quantize(w, bits, spec.symmetric, group, spec.option("step"))
    if spec.method == "lowbit_sparse":
        return lowbit_sparse_quantize(w, spec.option("w_bit"), spec.option("fraction"), spec.option("use_sigma"),
                                      spec.option("sigma_factor"))
    if spec.method == "gptq":
        return gptq_quantize(w, hessian, bits, spec.symmetric, group, spec.option("block_size"),
                             spec.option("percdamp"), spec.option("act_order"), spec.option("clip_search"))
    return quantize_weight_minmax(w, bits, spec.symmetric, group)


def quantize_weight_with_global(w: torch.Tensor, spec: QConfig, hessian: Optional[torch.Tensor] = None,
                                amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: (codes uint8 [out, in], block scales float32 [out, in/16] holding E4M3 values, global scale [1]);
    `amax` is the max|W| of the layer's fused group (default: this weight's)."""
    if w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs the input size ({w.shape[-1]}) to be a multiple of {NVFP4_BLOCK}")
    if spec.method == "gptq":
        return gptq_quantize_nvfp4(w, hessian, amax, spec.option("block_size"), spec.option("percdamp"),
                                   spec.option("act_order"))
    return quantize_weight_nvfp4(w, amax)


def fake_quantize_weight(w: torch.Tensor, spec: QConfig, hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float weight the kernel effectively multiplies with."""
    codes, scale, offset = quantize_weight(w.detach().float(), spec, hessian)
    return dequantize_weight(code_values(codes), scale, offset)
