"""One entry point for weight quantization by `QConfig.method`, as tensor functions."""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.gptq import gptq_quantize
from msmodelslim.quantizer.lowbit_sparse import lowbit_sparse_quantize
from msmodelslim.quantizer.primitives import dequantize_weight, quantize_weight_minmax
from msmodelslim.quantizer.scheme import QConfig
from msmodelslim.quantizer.ssz import ssz_quantize


def quantize_weight(w: torch.Tensor, spec: QConfig, hessian: Optional[torch.Tensor] = None):
    """(codes int8 [out, in], scale [out, n_groups], offset [out, n_groups]); gptq needs the input Hessian."""
    bits, group = spec.dtype.bits, spec.group_size
    if spec.method == "ssz":
        return ssz_quantize(w, bits, spec.symmetric, group, spec.option("step"))
    if spec.method == "lowbit_sparse":
        return lowbit_sparse_quantize(w, spec.option("w_bit"), spec.option("fraction"), spec.option("use_sigma"),
                                      spec.option("sigma_factor"))
    if spec.method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the Hessian of the layer's calibration inputs")
        return gptq_quantize(w, hessian, bits, spec.symmetric, group, spec.option("block_size"),
                             spec.option("percdamp"), spec.option("act_order"))
    return quantize_weight_minmax(w, bits, spec.symmetric, group)


def fake_quantize_weight(w: torch.Tensor, spec: QConfig, hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float weight the kernel effectively multiplies with."""
    return dequantize_weight(*quantize_weight(w.detach().float(), spec, hessian))
