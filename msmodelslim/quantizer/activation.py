"""What a deployed kernel does to a linear's input, as a tensor function (for methods that score or tune)."""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.dualscale import fake_quantize_act_dualscale
from msmodelslim.quantizer.float_formats import fp8_fake_quantize_per_token, mx_fake_quantize
from msmodelslim.quantizer.primitives import fake_quantize_input, quantize_per_token_dynamic, scale_offset_from_minmax
from msmodelslim.quantizer.scheme import QConfig, QDType, QScope


def fake_quantize_act(x: torch.Tensor, spec: QConfig,
                      static_qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Nothing for float inputs; per token for dynamic ones; for static ones the given (scale, offset), or one
    min/max range over these rows when none is given."""
    if spec.is_float:
        return x
    if spec.scope == QScope.dual_scale:  # S_dual per block of dual_block_size, then MXFP4, at run time
        return fake_quantize_act_dualscale(x, spec.ext["dual_block_size"])
    if spec.dtype.is_mx:  # per block of 32 at run time
        return mx_fake_quantize(x, spec.dtype.element)
    if spec.dtype == QDType.fp8_e4m3 and spec.scope == QScope.per_token:
        return fp8_fake_quantize_per_token(x)
    if spec.dtype.element is not None:  # pragma: no cover - resolve_scheme admits no other float activation
        raise ValueError(f"no run-time quantizer for act {spec.dtype.value} {spec.scope.value}")
    bits = spec.dtype.bits
    if spec.scope == QScope.per_token:
        return quantize_per_token_dynamic(x, bits)
    if static_qparams is None:
        static_qparams = scale_offset_from_minmax(x.amin(), x.amax(), bits, spec.symmetric)
    return fake_quantize_input(x, *static_qparams, bits)
