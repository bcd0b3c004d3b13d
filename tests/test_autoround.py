"""autoround_quant: the fake quantizer against an element-by-element reference, the tuning against
round-to-nearest on the output error it minimises, and the processor end to end."""
import pytest
import torch

from helpers import SCHEMES, outputs_of_both_runners, run_quant, small_calib, write_pipeline
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.quantizer.autoround import AutoRoundSettings, autoround_quantize, fake_quantize_groups
from msmodelslim.quantizer.primitives import dequantize_weight, quantize_weight_minmax, to_groups

F32 = dict(scale_dtype=torch.float32)


def correlated_layer(seed=0, n=512, k=64, out=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) @ torch.randn(6, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    x[:, 5] *= 8
    return x, torch.randn(out, k, generator=g) * 0.05


def slow_fake_quantize(w, v, a, b, bits, symmetric, group):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        for gi, g0 in enumerate(range(0, w.shape[1], group)):
            chunk = w[i, g0:g0 + group].tolist()
            lo, hi = min(min(chunk) * float(b[i, gi]), 0.0), max(max(chunk) * float(a[i, gi]), 0.0)
            if symmetric:
                step, zero = max(-lo, hi) / qmax, 0
            else:
                step = (hi - lo) / (qmax - qmin)
                zero = max(qmin, min(qmax, qmin - round(lo / step)))
            for j, value in enumerate(chunk):
                q = max(qmin, min(qmax, round(value / step + float(v[i, g0 + j])) + zero))
                out[i, g0 + j] = (q - zero) * step
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantizer_matches_a_slow_reference(symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 32, generator=g)
    v = (torch.rand(6, 32, generator=g) - 0.5) * 0.8
    a, b = 0.5 + 0.5 * torch.rand(6, 2, generator=g), 0.5 + 0.5 * torch.rand(6, 2, generator=g)
    fast = fake_quantize_groups(to_groups(w, 16), v.reshape(6, 2, 16), a, b, 4, symmetric, torch.float32)
    assert torch.allclose(fast.reshape(6, 32), slow_fake_quantize(w, v, a, b, 4, symmetric, 16), atol=1e-5)


@pytest.mark.parametrize("symmetric,group", [(True, 16), (False, 16), (True, None)])
def test_tuning_beats_round_to_nearest_on_the_output_error(symmetric, group):
    x, w = correlated_layer()
    reference = x @ w.T
    codes, scale, offset, loss, start = autoround_quantize(w, x, x, 4, symmetric, group,
                                                           AutoRoundSettings(iters=100, **F32))
    rtn = float((x @ dequantize_weight(*quantize_weight_minmax(w, 4, symmetric, group)).T - reference).pow(2).mean())
    assert start == pytest.approx(rtn, rel=1e-5)  # step 0 is round to nearest
    achieved = float((x @ dequantize_weight(codes, scale, offset).T - reference).pow(2).mean())
    assert achieved == pytest.approx(loss, rel=1e-4)  # the returned codes are the best step's
    assert achieved < 0.7 * rtn
    assert codes.abs().max() <= 8 and codes.dtype == torch.int8


def test_a_step_too_large_never_loses_to_round_to_nearest():
    x, w = correlated_layer(seed=2)
    _, _, _, loss, start = autoround_quantize(w, x, x, 4, True, 16, AutoRoundSettings(iters=3, lr=0.5, **F32))
    assert loss <= start


W4_G16 = {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": "autoround",
          "ext": {"group_size": 16, "scale_dtype": "float32"}}
AUTOROUND = {"type": "autoround_quant", "iters": 20, "strategies": [
    {"qconfig": {"weight": W4_G16}, "exclude": ["lm_head", "*down_proj"]},
    {"qconfig": {"act": SCHEMES["w4a8_dynamic"]["act"], "weight": {**SCHEMES["w4a8_dynamic"]["weight"],
                                                                   "method": "autoround"}},
     "include": ["*down_proj"]}]}


def test_processor_writes_both_strategies_and_beats_round_to_nearest(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    calib = small_calib(tmp_path)
    run_quant(tiny_llama, tmp_path / "ar", write_pipeline(tmp_path / "ar.yaml", [AUTOROUND], calib))
    description = (tmp_path / "ar" / "quant_model_description.json").read_text()
    assert '"model.layers.0.self_attn.q_proj.weight_packed": "W4A16"' in description
    assert '"model.layers.0.mlp.down_proj.weight": "W4A8_DYNAMIC"' in description
    rtn = {"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": {"weight": {**W4_G16, "method": "minmax", "ext": {"group_size": 16}}},
         "exclude": ["lm_head", "*down_proj"]},
        {"type": "linear_quant", "qconfig": SCHEMES["w4a8_dynamic"], "include": ["*down_proj"]}]}
    run_quant(tiny_llama, tmp_path / "rtn", write_pipeline(tmp_path / "rtn.yaml", [rtn], calib))
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
        errors = {n: float((load_ascendv1(tmp_path / n)(input_ids=ids).logits - reference).norm()) for n in ("ar", "rtn")}
    assert errors["ar"] < errors["rtn"], errors


def test_layer_wise_equals_model_wise(tiny_qwen2, tmp_path):
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, [AUTOROUND], "Qwen2-7B")
    assert layer_wise == model_wise


@pytest.mark.parametrize("change,needle", [
    ({"strategies": []}, "strategies"),
    ({"iters": 0}, "iters"),
    ({"strategies": [{"qconfig": {"weight": {**W4_G16, "method": "gptq"}}}]}, "tunes the weight rounding"),
    ({"strategies": [{"qconfig": {"weight": {**W4_G16, "ext": {"group_size": 16, "scale_dtype": "int8"}}}}]},
     "scale_dtype"),
])
def test_bad_settings_are_reported_early(tiny_llama, tmp_path, change, needle):
    with pytest.raises(ConfigError, match=needle):
        run_quant(tiny_llama, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", [{**AUTOROUND, **change}],
                                                      small_calib(tmp_path)))
    assert not (tmp_path / "out").exists()


def test_a_layer_claimed_by_autoround_and_linear_quant_is_rejected(tiny_llama, tmp_path):
    twice = [{"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "include": ["*q_proj"]}, AUTOROUND]
    with pytest.raises(ConfigError, match="matched by two rules"):
        run_quant(tiny_llama, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", twice, small_calib(tmp_path)))
