"""How much a quantized linear product loses after a per-input-channel scaling, as a tensor function.

Scaling input channel j by s_j (X / s, W · s) leaves X · Wᵀ unchanged in float; the kernel, though, computes
Q_a(X / s) · Q_w(W · s)ᵀ. Smoothing and AWQ-style searches pick s by this error.
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.activation import fake_quantize_act
from msmodelslim.quantizer.scheme import QConfig
from msmodelslim.quantizer.weight import fake_quantize_weight


def scaled_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, weight_spec: QConfig,
                        act_spec: QConfig, reference: torch.Tensor) -> float:
    """‖Q_a(X / s) · Q_w(W · s)ᵀ − X · Wᵀ‖ / ‖X · Wᵀ‖, with `reference` = X · Wᵀ."""
    out = fake_quantize_act(x / s, act_spec) @ fake_quantize_weight(weight * s, weight_spec).T
    return float((out - reference).norm() / reference.norm().clamp(min=1e-12))
