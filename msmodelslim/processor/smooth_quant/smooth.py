"""SmoothQuant as pure tensor functions.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
ICML 2023. For a linear Y = X·Wᵀ, dividing input channel j of X by s_j and multiplying column j of W by s_j
leaves Y unchanged; choosing

    s_j = max|X_j|^α / max|W_j|^(1-α)

moves the activation outliers (a few channels with huge |X_j|) into the weights, which quantize per output
channel and tolerate them. The division of X is folded into whatever produces X: the weight of the preceding
norm, or the output rows (and bias) of the preceding linear, so the transform costs nothing at run time.
"""
from __future__ import annotations

import torch

from msmodelslim.core.errors import ProcessingError
from msmodelslim.ir.online_rotation import input_rotation
from msmodelslim.model.interface import AttentionShape, MlaShape

EPS = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per input channel; channels that never fired keep s = 1."""
    s = act_absmax.float().clamp(min=EPS).pow(alpha) / weight_absmax.float().clamp(min=EPS).pow(1 - alpha)
    s = torch.where(act_absmax > 0, s, torch.ones_like(s))
    return s.clamp(min=EPS)


def column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max_i |W[i, j]| over all target linears (they share the input X)."""
    return torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()


def to_kv_channels(per_head_channel: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """[H·D] -> [Hkv·D]: max over the query heads that share each key/value head (GQA)."""
    group = shape.num_heads // shape.num_kv_heads
    return per_head_channel.reshape(shape.num_kv_heads, group, shape.head_dim).amax(dim=1).reshape(-1)


def from_kv_channels(per_kv_channel: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """[Hkv·D] -> [H·D]: each query head uses its key/value head's value channels."""
    group = shape.num_heads // shape.num_kv_heads
    return per_kv_channel.reshape(shape.num_kv_heads, 1, shape.head_dim).expand(-1, group, -1).reshape(-1)


def mla_value_rows(per_value_channel: torch.Tensor, shape: MlaShape) -> torch.Tensor:
    """[H·v_head_dim] -> kv_b_proj's rows [H·(qk_nope_head_dim + v_head_dim)]: each head's value rows take the
    scale, its key rows keep 1 (they feed the attention scores, which the scale must not change)."""
    values = per_value_channel.reshape(shape.num_heads, shape.v_head_dim)
    keys = torch.ones(shape.num_heads, shape.qk_nope_head_dim, dtype=values.dtype)
    return torch.cat([keys, values], dim=1).reshape(-1)


@torch.no_grad()
def divide_source(source: torch.nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """X /= s, folded into the producer: a norm's weight, or a linear's output rows and bias. A norm scaling by
    (norm_offset + weight) has its effective gain divided: weight' = (norm_offset + weight) / s - norm_offset."""
    weight = source.weight
    if weight.dim() == 1 and norm_offset:
        weight.copy_(((weight.double() + norm_offset) / s.double() - norm_offset).to(weight.dtype))
    elif weight.dim() == 1:
        weight.div_(s.to(weight.dtype))
    else:
        weight.div_(s.to(weight.dtype).unsqueeze(1))
    if getattr(source, "bias", None) is not None:
        source.bias.div_(s.to(source.bias.dtype))


@torch.no_grad()
def multiply_targets(targets: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """W[:, j] *= s_j for every consumer of X. A linear behind an online rotation reads T·X, not X: refused (the plan
    refuses such a pipeline first, app/quantize_checks.py)."""
    for linear in targets:
        if input_rotation(linear):
            raise ProcessingError(f"a {type(linear).__name__} rotated online by quarot cannot be smoothed afterwards: "
                                  f"its input is rotated; put the smoothing step before quarot")
        linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))
