"""awq and flex_awq_ssz: the cost against a slow reference, the search against brute force, float-exactness,
runner independence, and the gain over plain 4-bit round-to-nearest."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, outputs_of_both_runners, run_quant, small_calib, write_pipeline
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.processor.flex_awq_ssz.search import awq_scales, best_candidate, weight_mean
from msmodelslim.quantizer.error import scaled_output_error as output_error
from msmodelslim.quantizer.scheme import QConfig
from tiny_models import make_tiny_model

FLOAT = QConfig(dtype="float", scope="per_tensor", symmetric=True, method="none")
INT4_G16 = QConfig(dtype="int4", scope="per_group", symmetric=True, method="minmax", ext={"group_size": 16})
DYNAMIC = QConfig(dtype="int8", scope="per_token", symmetric=True, method="minmax")
W4_G16 = {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": "minmax", "ext": {"group_size": 16}}
W4_CHANNEL_SSZ = {"dtype": "int4", "scope": "per_channel", "symmetric": True, "method": "ssz"}


def outlier_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 40]] *= 25  # two hot input channels, as LLM activations have
    return x, torch.randn(48, 64, generator=g) * 0.1


def slow_output_error(x, weight, s, group, act_per_token):
    """Element by element: symmetric int4 per group of the scaled weight, optional int8 per-token input."""
    ws, xs = weight * s, x / s
    w_q = torch.empty_like(ws)
    for i in range(ws.shape[0]):
        for g0 in range(0, ws.shape[1], group):
            chunk = ws[i, g0:g0 + group].tolist()
            step = max(abs(v) for v in chunk) / 7
            w_q[i, g0:g0 + group] = torch.tensor([max(-8, min(7, round(v / step))) * step for v in chunk])
    if act_per_token:
        for t in range(xs.shape[0]):
            step = max(abs(v) for v in xs[t].tolist()) / 127
            xs[t] = torch.tensor([max(-128, min(127, round(v / step))) * step for v in xs[t].tolist()])
    ref = x @ weight.T
    return float((xs @ w_q.T - ref).norm() / ref.norm())


@pytest.mark.parametrize("act", [FLOAT, DYNAMIC])
def test_output_error_matches_a_slow_reference(act):
    x, weight = outlier_layer()
    x, weight = x[:24], weight[:5]
    s = awq_scales(x.abs().mean(0), weight_mean([weight], 16), 0.5, 0.2)
    fast = output_error(x, weight, s, INT4_G16, act, x @ weight.T)
    assert fast == pytest.approx(slow_output_error(x, weight, s, 16, act is DYNAMIC), rel=2e-3)


def test_weight_mean_and_scales_follow_their_definitions():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 2.0, -1.0, 1.0]])
    # groups of 2: row 0 -> [0.5, 1], [1, 0.125]; row 1 -> [1, 1], [1, 1]
    assert torch.allclose(weight_mean([w], 2), torch.tensor([0.75, 1.0, 1.0, 0.5625]))
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    s = awq_scales(act, torch.ones(4), 0.5, 0.0)
    raw = torch.tensor([2.0, 1.0, 1.0, 3.0])  # the silent channel keeps 1 before normalising
    assert torch.allclose(s, raw / (3.0 * 1.0) ** 0.5)


def test_awq_grid_finds_the_brute_force_optimum_and_beats_round_to_nearest():
    x, weight = outlier_layer()
    act, w_mean = x.abs().mean(0), weight_mean([weight], 16)
    ref = x @ weight.T

    def cost(a, b):
        return output_error(x, weight, awq_scales(act, w_mean, a, b), INT4_G16, FLOAT, ref)

    scored = {(a / 20, 0.0): cost(a / 20, 0.0) for a in range(20)}
    (alpha, _), error = best_candidate(scored, None, 4)
    assert error == min(scored.values()) == cost(alpha, 0.0)
    no_scaling = output_error(x, weight, torch.ones(64), INT4_G16, FLOAT, ref)
    assert scored[(0.0, 0.0)] == pytest.approx(no_scaling)
    assert error < 0.8 * no_scaling


def test_rescoring_lets_the_real_quantizer_decide():
    scored = {(0.1, 0.0): 1.0, (0.2, 0.0): 2.0, (0.3, 0.0): 3.0, (0.4, 0.0): 0.5}
    real = {(0.1, 0.0): 9.0, (0.2, 0.0): 1.5, (0.3, 0.0): 0.1, (0.4, 0.0): 8.0}
    assert best_candidate(scored, None, 2) == ((0.4, 0.0), 0.5)
    assert best_candidate(scored, lambda a, b: real[(a, b)], 2) == ((0.4, 0.0), 8.0)  # shortlist 0.4, 0.1
    assert best_candidate(scored, lambda a, b: real[(a, b)], 3) == ((0.2, 0.0), 1.5)
    assert best_candidate(scored, lambda a, b: real[(a, b)], 4) == ((0.3, 0.0), 0.1)


def outlier_model(path, family="llama"):
    source = make_tiny_model(path, family, seed=5)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 30
            layer.post_attention_layernorm.weight[[5, 40]] *= 20
        model.save_pretrained(source)
    return source, model


AWQ = {"type": "awq", "weight_qconfig": W4_G16}
FLEX_AWQ = {"type": "flex_awq_ssz", "qconfig": {"act": SCHEMES["w4a8_dynamic"]["act"], "weight": W4_CHANNEL_SSZ}}


@pytest.mark.parametrize("family,step", [("llama", AWQ), ("qwen3", AWQ), ("qwen2", FLEX_AWQ)])
def test_transform_alone_leaves_the_float_model_unchanged(tmp_path, family, step):
    source, model = outlier_model(tmp_path / "src", family)
    out = tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [step], small_calib(tmp_path)),
              {"llama": "Llama-2-7B", "qwen2": "Qwen2-7B", "qwen3": "Qwen3-8B"}[family])
    scaled = load_ascendv1(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, scaled(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scaled.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_flex_awq_ssz_layer_wise_equals_model_wise(tiny_qwen2, tmp_path):
    quant = {"type": "linear_quant", "qconfig": SCHEMES["w4a8_dynamic"], "exclude": ["lm_head"]}
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, [FLEX_AWQ, quant], "Qwen2-7B")
    assert layer_wise == model_wise


def test_awq_lowers_the_4bit_output_error_of_a_model_with_outliers(tmp_path):
    source, model = outlier_model(tmp_path / "src")
    calib = small_calib(tmp_path)
    quant = {"type": "linear_quant", "qconfig": {"weight": W4_G16}, "exclude": ["lm_head"]}
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    errors = {}
    for name, process in {"rtn": [quant], "awq": [AWQ, quant]}.items():
        run_quant(source, tmp_path / name, write_pipeline(tmp_path / f"{name}.yaml", process, calib))
        with torch.no_grad():
            errors[name] = float((load_ascendv1(tmp_path / name)(input_ids=ids).logits - reference).norm())
    assert errors["awq"] < 0.9 * errors["rtn"], errors


@pytest.mark.parametrize("step,needle", [
    ({"type": "awq", "weight_qconfig": {**W4_G16, "method": "gptq"}}, "cannot score"),
    ({"type": "flex_awq_ssz"}, "qconfig"),
    ({"type": "awq", "weight_qconfig": W4_G16, "n_grid": 1}, "n_grid"),
])
def test_bad_settings_are_reported_early(tiny_llama, tmp_path, step, needle):
    with pytest.raises(ConfigError, match=needle):
        run_quant(tiny_llama, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", [step], small_calib(tmp_path)))
    assert not (tmp_path / "out").exists()
