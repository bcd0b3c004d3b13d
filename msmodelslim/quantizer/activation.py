"""What a deployed kernel does to a linear's input, as a tensor function (for methods that score or tune)."""
from __future__ import annotations

from typing import Optional

import torch

from msmodelslim.quantizer.primitives import fake_quantize, quantize_per_token_dynamic, scale_offset_from_minmax
from msmodelslim.quantizer.scheme import QConfig, QScope


def fake_quantize_act(x: torch.Tensor, spec: QConfig,
                      static_qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Nothing for float inputs; per token for dynamic ones; for static ones the given (scale, offset), or one
    min/max range over these rows when none is given."""
    if spec.is_float:
        return x
    bits = spec.dtype.bits
    if spec.scope == QScope.per_token:
        return quantize_per_token_dynamic(x, bits)
    if static_qparams is None:
        static_qparams = scale_offset_from_minmax(x.amin(), x.amax(), bits, spec.symmetric)
    return fake_quantize(x, *static_qparams, bits)
