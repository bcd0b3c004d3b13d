"""autoround_quant on the floating-point grids (quantizer/autoround_float.py): the grid step and the fake
quantizer against slow element-by-element references built from the enumerated grids, step 0 against the
minmax quantizer, the tuning against round to nearest on the output error, and the processor end to end
(checkpoint read back by our reader and the independent reference reader)."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_quant, small_calib, write_pipeline
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.quantizer.autoround import AutoRoundSettings
from msmodelslim.quantizer.autoround_float import autoround_quantize_float, element_step, fake_quantize_float
from msmodelslim.quantizer.float_formats import code_values, quantize_weight_float
from msmodelslim.quantizer.primitives import dequantize_weight
from reference_reader import load_reference_model

F32 = dict(scale_dtype=torch.float32)


def positive_grid(element):
    """Every non-negative value of the element format, ascending, read from its codes."""
    if element == "fp4_e2m1":
        return [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN in E4M3 "fn"
    return sorted(set(codes.view(torch.float8_e4m3fn).float().tolist()))


@pytest.mark.parametrize("element", ["fp4_e2m1", "fp8_e4m3"])
def test_the_step_is_the_gap_between_the_grid_points_around_a_value(element):
    grid = positive_grid(element)
    inside = [(lo + hi) / 2 for lo, hi in zip(grid, grid[1:])]
    gaps = [hi - lo for lo, hi in zip(grid, grid[1:])]
    values = torch.tensor(inside + [-v for v in inside])
    assert element_step(values, element).tolist() == gaps + gaps


def slow_fake_quantize(w, v, a, dtype):
    """Ŵ element by element: the scale from the row's (FP8) or block's (MX) max, the offset in grid steps, the
    nearest grid value after saturation."""
    element = "fp8_e4m3" if dtype in ("fp8_e4m3", "mxfp8") else "fp4_e2m1"
    grid = positive_grid(element)
    largest, emax = grid[-1], {"fp8_e4m3": 8, "fp4_e2m1": 2}[element]
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        row = w[i].tolist()
        for j, value in enumerate(row):
            if dtype == "fp8_e4m3":
                scale = float(a[i, 0]) * max(abs(t) for t in row) / 448
            else:
                block = j // 32
                amax = max(abs(t) for t in row[32 * block:32 * block + 32]) * float(a[i, block])
                scale = 2.0 ** (math.frexp(amax)[1] - 1 - emax)
            y = value / scale
            above = next(g for g in grid[1:] if g > abs(y)) if abs(y) < largest else largest
            below = max(g for g in grid if g <= abs(y)) if abs(y) < largest else grid[-2]
            shifted = min(max(y + float(v[i, j]) * (above - below), -largest), largest)
            nearest = min(grid, key=lambda g: abs(g - abs(shifted)))
            out[i, j] = math.copysign(nearest, shifted) * scale
    return out


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp8", "mxfp4"])
def test_fake_quantizer_matches_a_slow_reference(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 64, generator=g)
    v = (torch.rand(5, 64, generator=g) - 0.5) * 0.9
    factors = (5, 1) if dtype == "fp8_e4m3" else (5, 2)
    a = 0.5 + torch.rand(factors, generator=g) * (0.5 if dtype == "fp8_e4m3" else 1.5)
    fast, _ = fake_quantize_float(w, v, a, dtype)
    assert torch.allclose(fast, slow_fake_quantize(w, v, a, dtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp8", "mxfp4"])
def test_step_zero_is_the_minmax_quantizer(dtype):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = w[1, :32] / w[1, :32].abs().max() * 4  # amax an exact power of two
    factors = (6, 1) if dtype == "fp8_e4m3" else (6, 2)
    fast, _ = fake_quantize_float(w, torch.zeros_like(w), torch.ones(factors), dtype)
    codes, scale, offset = quantize_weight_float(w, dtype)
    assert torch.equal(fast, dequantize_weight(code_values(codes), scale, offset))


def correlated_layer(seed=0, n=512, k=64, out=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) @ torch.randn(6, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    x[:, 5] *= 8
    return x, torch.randn(out, k, generator=g) * 0.05


@pytest.mark.parametrize("dtype,gain", [("fp8_e4m3", 0.8), ("mxfp8", 0.95), ("mxfp4", 0.8)])
def test_tuning_beats_round_to_nearest_on_the_output_error(dtype, gain):
    x, w = correlated_layer()
    reference = x @ w.T
    codes, scale, offset, loss, start = autoround_quantize_float(w, x, x, dtype, AutoRoundSettings(iters=100, **F32))
    rtn = dequantize_weight(code_values(quantize_weight_float(w, dtype)[0]), *quantize_weight_float(w, dtype)[1:])
    rtn_error = float((x @ rtn.T - reference).pow(2).mean())
    assert start == pytest.approx(rtn_error, rel=1e-5)
    achieved = float((x @ dequantize_weight(code_values(codes), scale, offset).T - reference).pow(2).mean())
    assert achieved == pytest.approx(loss, rel=1e-4)  # the stored codes and scales are the best step's
    assert achieved < gain * rtn_error
    assert codes.dtype == (torch.uint8 if dtype == "mxfp4" else torch.float8_e4m3fn)
    if dtype != "fp8_e4m3":  # MX scales stay powers of two
        assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))


MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True}
FP8 = {"dtype": "fp8_e4m3", "symmetric": True}
STRATEGIES = [
    {"qconfig": {"weight": {**MXFP4, "method": "autoround", "ext": {"scale_dtype": "float32"}}},
     "exclude": ["lm_head", "*down_proj"]},
    {"qconfig": {"act": {**FP8, "scope": "per_token", "method": "minmax"},
                 "weight": {**FP8, "scope": "per_channel", "method": "autoround", "ext": {"scale_dtype": "float32"}}},
     "include": ["*down_proj"]}]


def test_processor_writes_float_types_that_both_readers_agree_on_and_beats_minmax(tiny_llama, tmp_path):
    calib = small_calib(tmp_path)
    tuned = write_pipeline(tmp_path / "ar.yaml", [{"type": "autoround_quant", "iters": 30, "strategies": STRATEGIES}],
                           calib)
    run_quant(tiny_llama, tmp_path / "ar", tuned)
    description = (tmp_path / "ar" / "quant_model_description.json").read_text()
    assert '"model.layers.0.self_attn.q_proj.weight": "W4A16_MXFP4"' in description
    assert '"model.layers.0.mlp.down_proj.weight": "W8A8FP8_DYNAMIC"' in description
    minmax = [{"type": "linear_quant", "qconfig": {"weight": {**MXFP4, "method": "minmax"}},
               "exclude": ["lm_head", "*down_proj"]},
              {"type": "linear_quant", "include": ["*down_proj"],
               "qconfig": {"act": {**FP8, "scope": "per_token", "method": "minmax"},
                           "weight": {**FP8, "scope": "per_channel", "method": "minmax"}}}]
    run_quant(tiny_llama, tmp_path / "rtn", write_pipeline(tmp_path / "rtn.yaml", minmax, calib))
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
        ours = load_ascendv1(tmp_path / "ar")(input_ids=ids).logits
        independent = load_reference_model(tmp_path / "ar")(input_ids=ids).logits
        rtn = load_ascendv1(tmp_path / "rtn")(input_ids=ids).logits
    assert torch.allclose(ours, independent, atol=1e-4, rtol=1e-4)
    assert float((ours - reference).norm()) < float((rtn - reference).norm())


@pytest.mark.parametrize("weight,needle", [
    ({"dtype": "nvfp4", "scope": "per_block", "symmetric": True, "method": "autoround"}, "does not tune nvfp4"),
    ({**MXFP4, "scope": "dual_scale", "method": "autoround", "ext": {"dual_block_size": 512}},
     "does not tune mxfp4 dual_scale"),
])
def test_two_level_scales_are_refused_by_name_before_any_weight_is_read(tiny_llama, tmp_path, weight, needle):
    config = write_pipeline(tmp_path / "c.yaml", [{"type": "autoround_quant", "strategies": [
        {"qconfig": {"weight": weight}, "exclude": ["lm_head"]}]}], small_calib(tmp_path))
    with pytest.raises(ConfigError, match=needle):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
