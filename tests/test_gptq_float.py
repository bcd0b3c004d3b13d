"""GPTQ on the floating-point grids (fp8_e4m3 per channel, mxfp8 and mxfp4 per block of 32): against a slow
reference that updates an explicit inverse Hessian column by column, against round-to-nearest on the layer
output, and end to end (config -> ascendv1 -> both readers -> checker)."""
import pytest
import torch

from helpers import MODEL_TYPE, run_quant, small_calib, write_config
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.float_formats import (code_values, power_of_two, quantize_weight_float, round_fp4_e2m1,
                                                 round_fp8_e4m3)
from msmodelslim.quantizer.gptq import accumulate_hessian, gptq_quantize_float
from msmodelslim.quantizer.primitives import dequantize_weight
from reference_reader import load_reference_model
from test_weight_methods import correlated_inputs

ROUND = {"fp8_e4m3": round_fp8_e4m3, "mxfp8": round_fp8_e4m3, "mxfp4": round_fp4_e2m1}
EMAX = {"mxfp8": 8, "mxfp4": 2}


def slow_block_scale(row_block: torch.Tensor, dtype: str) -> float:
    """The power-of-two scale of one row's block of 32: 2^(floor(log2 amax) - emax) or twice that, whichever
    rounds the block with the smaller squared error (the lower one on a tie)."""
    amax = float(row_block.abs().max())
    if amax == 0:
        return 2.0 ** -127
    low = 2.0 ** (torch.floor(torch.log2(torch.tensor(amax, dtype=torch.float64))).item() - EMAX[dtype])
    errors = [float(((ROUND[dtype](row_block / s) * s - row_block) ** 2).sum()) for s in (low, 2 * low)]
    return 2 * low if errors[1] < errors[0] else low


def slow_gptq_float(w, h, dtype, percdamp=0.01):
    """Optimal Brain Quantization in column order with an explicit inverse Hessian, updated by elimination after
    each column; a block's scale is chosen row by row when its first column is reached (FP8: one scale per row
    from the original weights)."""
    w = w.double().clone()
    h = h.double().clone() + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    rows, cols = w.shape
    values = torch.zeros(rows, cols, dtype=torch.float64)
    scale = torch.zeros(rows, dtype=torch.float64)
    if dtype == "fp8_e4m3":
        scale = w.abs().amax(dim=1) / 448
    for j in range(cols):
        if dtype != "fp8_e4m3" and j % 32 == 0:
            scale = torch.tensor([slow_block_scale(w[r, j:j + 32].float(), dtype) for r in range(rows)],
                                 dtype=torch.float64)
        v = ROUND[dtype]((w[:, j] / scale).float()).double()
        values[:, j] = v
        e = (w[:, j] - v * scale) / hinv[j, j]
        w[:, j + 1:] -= e.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return values


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp8", "mxfp4"])
def test_float_gptq_matches_the_slow_reference(dtype):
    x = correlated_inputs(k=64)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    h, _ = accumulate_hessian(None, 0, x)
    codes, scale, offset = gptq_quantize_float(w, h, dtype, block_size=32)
    assert torch.equal(offset, torch.zeros_like(scale))
    if dtype != "fp8_e4m3":  # every scale a power of two, one per block of 32
        assert scale.shape == (24, 2) and bool((torch.frexp(scale)[0] == 0.5).all())
    reference = slow_gptq_float(w, h, dtype)
    assert (code_values(codes).double() == reference).float().mean() > 0.99  # float32 vs float64 rare ties


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp8", "mxfp4"])
def test_float_gptq_beats_round_to_nearest_on_the_layer_output(dtype):
    x = correlated_inputs(k=64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    h, _ = accumulate_hessian(None, 0, x)
    reference = x @ w.T

    def output_error(codes, scale, offset):
        return (x @ dequantize_weight(code_values(codes), scale, offset).T - reference).pow(2).mean().item()

    gptq = output_error(*gptq_quantize_float(w, h, dtype))
    rtn = output_error(*quantize_weight_float(w, dtype))
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act,weight_dtype,scheme", [
    (None, "mxfp4", "W4A16_MXFP4"), ("mxfp8", "mxfp4", "W4A8_MXFP"), ("mxfp8", "mxfp8", "W8A8_MXFP8"),
    ("fp8_e4m3", "fp8_e4m3", "W8A8FP8_DYNAMIC")])
def test_float_gptq_end_to_end(tiny_llama, tmp_path, act, weight_dtype, scheme):
    def spec(dtype, scope):
        return {"dtype": dtype, "scope": scope, "symmetric": True, "method": "minmax"}

    mx = weight_dtype != "fp8_e4m3"
    qconfig = {"weight": {**spec(weight_dtype, "per_block" if mx else "per_channel"), "method": "gptq"}}
    if act is not None:
        qconfig["act"] = spec(act, "per_block" if mx else "per_token")
    out = tmp_path / "out"
    report = run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", qconfig, dataset=small_calib(tmp_path)),
                       MODEL_TYPE["llama"])
    assert set(report.plan.values()) == {scheme, "FLOAT"}
    assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []
    ours, reference = load_ascendv1(out), load_reference_model(out)
    assert any(isinstance(m, QuantLinear) for m in ours.modules())
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    if mx:  # the saved scales are powers of two
        for module in ours.modules():
            if isinstance(module, QuantLinear):
                scale = module.weight_scale.float()
                assert torch.equal(scale, power_of_two(torch.frexp(scale)[1] - 1))
