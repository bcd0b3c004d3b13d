"""Non-fusion smoothing: a smoothing scale applied at run time where no producer can absorb it.

SmoothQuant (Xiao et al., ICML 2023) divides input channel j of X by s_j and multiplies column j of W by s_j.
Normally the division is folded into the producer of X (a norm's gain, a linear's rows). When X comes from a
modulated norm without parameters (a DiT's adaLN: norm(x)·(1 + scale) + shift, scale and shift from the timestep)
or from a non-linear activation (GELU before ffn.net.2), nothing can absorb it, so the linear is wrapped:

    NonFusionSmooth(x) = linear(div(x)),   div(x) = x · mul_scale,   mul_scale = 1 / s,   linear.weight = W · s

The established format's layout (protocol.md §4.4, "Non-fusion smooth"): `<p>.div.mul_scale` (FLOAT) and the
wrapped linear under `<p>.linear.*` (quantized or FLOAT), so `<p>.weight` is absent. vLLM-Ascend does not apply it
(formats.md); MindIE-SD and our reader do.
"""
from __future__ import annotations

import torch
from torch import nn

WRAPPED = "linear"  # the child holding the wrapped linear (`<p>.linear.*`)
DIVISION = "div"  # the child holding mul_scale (`<p>.div.mul_scale`)


class InputDivision(nn.Module):
    """x · mul_scale per input channel (mul_scale = 1/s)."""

    def __init__(self, mul_scale: torch.Tensor) -> None:
        super().__init__()
        self.mul_scale = nn.Parameter(mul_scale.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mul_scale.to(device=x.device, dtype=x.dtype)


class NonFusionSmooth(nn.Module):
    """A linear whose input is divided by the smoothing scale at run time (its columns were multiplied by it)."""

    def __init__(self, linear: nn.Module, mul_scale: torch.Tensor) -> None:
        super().__init__()
        self.div = InputDivision(mul_scale)
        self.linear = linear

    # what code around the linear reads (e.g. the attention's head width from to_q.out_features)
    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.div(x))


@torch.no_grad()
def wrap_with_division(root: nn.Module, relative_name: str, s: torch.Tensor) -> NonFusionSmooth:
    """W[:, j] *= s_j on the linear at `relative_name` and wrap it so its input is multiplied by 1/s. A linear that
    is already wrapped takes the new scale into both (the scales of two smoothing passes multiply)."""
    module = root.get_submodule(relative_name)
    linear = module.linear if isinstance(module, NonFusionSmooth) else module
    linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))
    inverse = 1.0 / s.double()
    if isinstance(module, NonFusionSmooth):
        module.div.mul_scale.mul_(inverse.to(module.div.mul_scale.dtype))
        return module
    wrapper = NonFusionSmooth(linear, inverse.to(torch.float32).to(linear.weight.device))
    parent_name, _, child = relative_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, wrapper)
    return wrapper


def pattern_name(root: nn.Module, relative_name: str) -> str:
    """The name include/exclude patterns see for the module at `relative_name`: a wrapped linear (`<p>.linear`)
    is still matched as `<p>`, the name it had before smoothing wrapped it."""
    parent_name, _, child = relative_name.rpartition(".")
    if child == WRAPPED and parent_name and isinstance(root.get_submodule(parent_name), NonFusionSmooth):
        return parent_name
    return relative_name


def wrapper_name(name: str) -> str:
    """`<p>` for the wrapped linear's name `<p>.linear` (its position in the model: e.g. row-parallel)."""
    return name.removesuffix(f".{WRAPPED}")
