"""Read-back of dynamic W8A8 / W4A8 on a CPU through torch's int8 matmul (issue #26 item 2): the same activation
codes as the fake-quantized float path, integer products summed exactly, so the outputs agree with the slow
reference below up to float32 rounding; other layers keep the float path."""
import pytest
import torch

from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.scheme import Scheme


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: s_t = max|x_t| / 127, q_t = clamp(round(x_t / s_t)), out = s_t (q_t · q_w) s_w + b."""
    rows = x.reshape(-1, x.shape[-1]).double()
    out = []
    for row in rows:
        s = max(float(row.abs().max()) / 127, torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round((row.float() / s).double()), -128, 127)
        out.append((codes.double() @ q) * s * scale.double().reshape(-1) + bias.double())
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scheme,low,high", [(Scheme.W8A8_DYNAMIC, -128, 127), (Scheme.W4A8_DYNAMIC, -8, 7),
                                             (Scheme.W8A8_MIX, -128, 127)])
def test_the_int8_path_matches_the_token_by_token_reference(scheme, low, high):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(low, high + 1, (24, 64), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(24, 1, generator=g) / 100, torch.randn(24, generator=g)
    extra = {"input_scale": torch.tensor(0.05), "input_offset": torch.tensor(0.0)} if scheme == Scheme.W8A8_MIX else {}
    layer = QuantLinear(scheme, codes, scale, torch.zeros(24, 1), bias=bias, **extra)
    x = torch.randn(2, 5, 64, generator=g) * 3
    x[0, 1] = 0  # an all-zero token
    assert layer._int8_kernel_applies(x)
    out = layer(x)
    expected = reference(x, codes, scale, bias)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 24)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), (out.double() - expected).abs().max()


def test_layers_the_int8_path_does_not_cover_keep_the_float_path():
    codes = torch.randint(-128, 128, (24, 64), dtype=torch.int8)
    x = torch.randn(3, 64)
    grouped = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 2), torch.zeros(24, 2))
    offset = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 1), torch.ones(24, 1))
    static = QuantLinear(Scheme.W8A8, codes, torch.rand(24, 1), torch.zeros(24, 1), input_scale=torch.tensor(0.1),
                         input_offset=torch.tensor(0.0))
    odd = QuantLinear(Scheme.W8A8_DYNAMIC, codes[:, :60].contiguous(), torch.rand(24, 1), torch.zeros(24, 1))
    mix_decode = QuantLinear(Scheme.W8A8_MIX, codes, torch.rand(24, 1), torch.zeros(24, 1),
                             input_scale=torch.tensor(0.1), input_offset=torch.tensor(0.0))
    mix_decode.decode_path = True
    for layer in (grouped, offset, static, mix_decode):
        assert not layer._int8_kernel_applies(x)
    assert not odd._int8_kernel_applies(torch.randn(3, 60))
