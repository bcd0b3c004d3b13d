"""Read-back of dynamic W8A8 / W4A8 / W8A8_MIX (prefill) on a CPU through torch's int8 matmul (issue #26 item 2):
formats.md A.4.3's kernel, y = s_t · s_w · Σ_k x_q W_q + b, with the integer sums exact. Checked bit for bit
against a token-by-token reference that sums in Python integers; other layers keep the float path."""
import pytest
import torch

from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.scheme import Scheme


def kernel_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Token by token: s_t = max|x_t| / 127 and x_q = clamp(round(x_t / s_t)) in float32; Σ_k x_q W_q in Python
    integers; that sum rounded to float32 once, times s_t, times s_w, plus b (float32 throughout)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = []
    for row in rows:
        s = torch.clamp(row.abs().max() / 127, min=torch.finfo(torch.float32).tiny)
        x_q = [int(v) for v in torch.clamp(torch.round(row / s), -128, 127)]
        sums = torch.tensor([sum(a * int(w) for a, w in zip(x_q, weights)) for weights in codes], dtype=torch.float32)
        out.append(sums * s * scale.reshape(-1) + bias)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scheme,low,high", [(Scheme.W8A8_DYNAMIC, -128, 127), (Scheme.W4A8_DYNAMIC, -8, 7),
                                             (Scheme.W8A8_MIX, -128, 127)])
def test_the_integer_path_is_the_kernel_bit_for_bit(scheme, low, high):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(low, high + 1, (24, 61), generator=g, dtype=torch.int8)  # odd sizes: any shape runs
    scale, bias = torch.rand(24, 1, generator=g) / 100, torch.randn(24, generator=g)
    extra = {"input_scale": torch.tensor(0.05), "input_offset": torch.tensor(0.0)} if scheme == Scheme.W8A8_MIX else {}
    layer = QuantLinear(scheme, codes, scale, torch.zeros(24, 1), bias=bias, **extra)
    x = torch.randn(2, 5, 61, generator=g) * 3
    x[0, 1] = 0  # an all-zero token
    x[1, 2, :4] = torch.tensor([127.0, 63.5, -0.5, 1.5])  # s_t = 1: codes on exact half steps (ties to even)
    x[1, 2, 4:] = 0.25
    assert layer.integer_kernel_applies(x)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 24)
    assert torch.equal(out, kernel_reference(x, codes, scale, bias))
    float_path = torch.nn.functional.linear(layer.quantize_input(x), layer.dequantized_weight(), layer.bias)
    assert torch.allclose(out, float_path, rtol=1e-5, atol=1e-5)  # the same codes: float rounding apart


def test_layers_the_integer_path_does_not_cover_keep_the_float_path():
    codes = torch.randint(-128, 128, (24, 64), dtype=torch.int8)
    x = torch.randn(3, 64)
    grouped = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 2), torch.zeros(24, 2))
    offset = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 1), torch.ones(24, 1))
    static = QuantLinear(Scheme.W8A8, codes, torch.rand(24, 1), torch.zeros(24, 1), input_scale=torch.tensor(0.1),
                         input_offset=torch.tensor(0.0))
    mix_decode = QuantLinear(Scheme.W8A8_MIX, codes, torch.rand(24, 1), torch.zeros(24, 1),
                             input_scale=torch.tensor(0.1), input_offset=torch.tensor(0.0))
    mix_decode.decode_path = True
    rotated = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 1), torch.zeros(24, 1),
                          rotation={"heads_rotation": torch.eye(8)})
    replaced = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 1), torch.zeros(24, 1))
    replaced.quantize_input = lambda t: t  # a caller's own activation quantizer is honoured
    for layer in (grouped, offset, static, mix_decode, rotated, replaced):
        assert not layer.integer_kernel_applies(x)
    assert torch.equal(replaced(x), torch.nn.functional.linear(x, replaced.dequantized_weight()))


def test_eligibility_follows_the_weight_tensors():
    """The integer-kernel check is kept between calls but redone when an offset changes in place or a scale is
    replaced (a per-group scale or a non-zero offset leaves the kernel)."""
    codes = torch.randint(-128, 128, (24, 64), dtype=torch.int8)
    layer = QuantLinear(Scheme.W8A8_DYNAMIC, codes, torch.rand(24, 1), torch.zeros(24, 1))
    x = torch.randn(3, 64)
    assert layer.integer_kernel_applies(x)
    with torch.no_grad():
        layer.weight_offset[0, 0] = 1.0
    assert not layer.integer_kernel_applies(x)
    with torch.no_grad():
        layer.weight_offset.zero_()
    assert layer.integer_kernel_applies(x)
    layer.weight_scale, layer.weight_offset = torch.rand(24, 2), torch.zeros(24, 2)
    assert not layer.integer_kernel_applies(x)


def test_layers_reading_the_same_input_quantize_it_once(monkeypatch):
    """keep_decoded_weights shares the last input's codes: q/k/v-like siblings on one tensor quantize it once, a
    new tensor or an in-place change of the same one is quantized again, and every output stays the kernel's."""
    from msmodelslim.ir import quant_linear
    from msmodelslim.ir.quant_linear import keep_decoded_weights

    g = torch.Generator().manual_seed(3)
    layers = torch.nn.ModuleList(
        QuantLinear(Scheme.W8A8_DYNAMIC, torch.randint(-128, 128, (16, 40), generator=g, dtype=torch.int8),
                    torch.rand(16, 1, generator=g) / 100, torch.zeros(16, 1), bias=torch.randn(16, generator=g))
        for _ in range(3))
    keep_decoded_weights(layers)
    quantized = []
    real = quant_linear.per_token_codes
    monkeypatch.setattr(quant_linear, "per_token_codes", lambda x, bits: quantized.append(x) or real(x, bits))

    def expected(layer, x):
        return kernel_reference(x, layer.qweight, layer.weight_scale, layer.bias)

    x = torch.randn(1, 1, 40, generator=g)  # one token, as in generation
    for layer in layers:
        assert torch.equal(layer(x), expected(layer, x))
    assert len(quantized) == 1
    x.mul_(2)  # in place: the same object, a new version
    assert torch.equal(layers[0](x), expected(layers[0], x)) and len(quantized) == 2
    y = x.clone()  # equal values, another tensor
    assert torch.equal(layers[1](y), expected(layers[1], y)) and len(quantized) == 3
    alone = QuantLinear(Scheme.W8A8_DYNAMIC, layers[0].qweight, layers[0].weight_scale, torch.zeros(16, 1),
                        bias=layers[0].bias)  # not under keep_decoded_weights: quantizes every call
    alone(y), alone(y)
    assert len(quantized) == 5
