"""iter_smooth and flex_smooth_quant: float-exact, runner-independent, and their scale rules checked against
slow scalar references."""
import itertools

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, STATIC_W8A8_STEP, outputs_of_both_runners, run_quant, small_calib, write_pipeline
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.processor.flex_smooth_quant.search import GRID, flex_scales, quantized_error, search_alpha_beta
from msmodelslim.processor.iter_smooth.processor import iter_smooth_scales
from tiny_models import make_tiny_model

MODEL_TYPE = {"llama": "Llama-2-7B", "qwen2": "Qwen2-7B", "qwen3": "Qwen3-8B"}
STEPS = {
    "iter_smooth": {"type": "iter_smooth"},
    "flex_smooth_quant": {"type": "flex_smooth_quant"},
    "flex_smooth_quant_static": {"type": "flex_smooth_quant", "act_scope": "per_tensor"},
}


def planted_outliers(source):
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[5] *= 25
        model.save_pretrained(source)
    return model


@pytest.mark.parametrize("family,step", list(itertools.product(["llama", "qwen2", "qwen3"], ["iter_smooth", "flex_smooth_quant"])))
def test_transform_alone_leaves_the_float_model_unchanged(tmp_path, family, step):
    source = make_tiny_model(tmp_path / "src", family, seed=3)
    model = planted_outliers(source)
    out = tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [STEPS[step]], small_calib(tmp_path)), MODEL_TYPE[family])
    smoothed = load_ascendv1(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, smoothed(input_ids=ids).logits
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    for name in ("input_layernorm", "post_attention_layernorm"):
        assert not torch.allclose(getattr(smoothed.model.layers[0], name).weight,
                                  getattr(model.model.layers[0], name).weight), f"{name} was not smoothed"
    assert not torch.allclose(smoothed.model.layers[0].self_attn.v_proj.weight, model.model.layers[0].self_attn.v_proj.weight)


@pytest.mark.parametrize("step", ["iter_smooth", "flex_smooth_quant_static"])
def test_layer_wise_equals_model_wise(tiny_qwen2, tmp_path, step):
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, [STEPS[step], STATIC_W8A8_STEP], "Qwen2-7B")
    assert layer_wise == model_wise


def test_composes_with_group_and_w4a8(tiny_llama, tmp_path):
    group = {"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head", "*down_proj"]},
        {"type": "linear_quant", "qconfig": SCHEMES["w4a8_dynamic"], "include": ["*down_proj"]}]}
    out = tmp_path / "out"
    run_quant(tiny_llama, out,
              write_pipeline(tmp_path / "c.yaml", [STEPS["iter_smooth"], STEPS["flex_smooth_quant"], group],
                                     small_calib(tmp_path)))
    description = (out / "quant_model_description.json").read_text()
    assert '"model.layers.0.mlp.down_proj.weight": "W4A8_DYNAMIC"' in description
    assert '"model.layers.0.self_attn.q_proj.weight": "W8A8"' in description


def test_iter_smooth_scales_match_a_scalar_reference():
    act = torch.tensor([4.0, 0.5, 0.0, 1e-9])
    weight = torch.tensor([2.0, 0.25, 3.0, 1.0])
    alpha, scale_min = 0.9, 1e-5
    expected = []
    for a, w in zip(act.tolist(), weight.tolist()):
        expected.append(1.0 if a == 0 else max(a ** alpha / w ** (1 - alpha), scale_min))
    assert torch.allclose(iter_smooth_scales(act, weight, alpha, scale_min), torch.tensor(expected))


def test_iter_smooth_refuses_a_requested_subgraph_the_adapter_lacks(tiny_llama, tmp_path):
    step = {"type": "iter_smooth", "enable_subgraph_type": ["linear-linear"]}
    with pytest.raises(UnsupportedError, match="LlamaAdapter describes no linear-linear subgraph"):
        run_quant(tiny_llama, tmp_path / "o", write_pipeline(tmp_path / "c.yaml", [step], small_calib(tmp_path)))


def test_iter_smooth_after_linear_quant_is_an_error(tiny_llama, tmp_path):
    process = [{"type": "linear_quant", "qconfig": SCHEMES["w8a16"]}, {"type": "iter_smooth"}]
    with pytest.raises(ConfigError, match=r"process\[1\] \(iter_smooth\) comes after process\[0\]"):
        run_quant(tiny_llama, tmp_path / "o", write_pipeline(tmp_path / "c.yaml", process, small_calib(tmp_path)))


def _outlier_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(384, 48, generator=g)
    x[:, [5, 30]] *= 50
    weight = torch.randn(24, 48, generator=g) * 0.1
    return x, weight


def _slow_error(x, weight, s, act_scope):
    """Element-by-element int8 reference of the search's cost (no shared code with search.py)."""
    xs, ws = x / s, weight * s
    w_q = torch.empty_like(ws)
    for i in range(ws.shape[0]):
        step = max(abs(v) for v in ws[i].tolist()) / 127
        w_q[i] = torch.tensor([max(-128, min(127, round(v / step))) * step for v in ws[i].tolist()])
    if act_scope == "per_token":
        x_q = torch.empty_like(xs)
        for t in range(xs.shape[0]):
            step = max(abs(v) for v in xs[t].tolist()) / 127
            x_q[t] = torch.tensor([max(-128, min(127, round(v / step))) * step for v in xs[t].tolist()])
    else:
        lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
        step = (hi - lo) / 255
        zero = max(-128, min(127, -128 - round(lo / step)))
        x_q = ((torch.round(xs / step) + zero).clamp(-128, 127) - zero) * step
    ref = x @ weight.T
    return float((x_q @ w_q.T - ref).norm() / ref.norm())


@pytest.mark.parametrize("act_scope", ["per_token", "per_tensor"])
def test_flex_cost_matches_a_slow_reference(act_scope):
    x, weight = _outlier_layer()
    x, weight = x[:32], weight[:6]
    s = flex_scales(x.abs().amax(0), weight.abs().amax(0), 0.6, 0.3)
    assert quantized_error(x, weight, s, act_scope) == pytest.approx(_slow_error(x, weight, s, act_scope), rel=2e-3)


@pytest.mark.parametrize("act_scope", ["per_token", "per_tensor"])
def test_flex_search_finds_the_two_stage_optimum_and_beats_plain_choices(act_scope):
    x, weight = _outlier_layer()
    act, w = x.abs().amax(0), weight.abs().amax(0)
    result = search_alpha_beta(x, weight, lambda a, b: flex_scales(act, w, a, b), act_scope)

    def cost(a, b):
        return quantized_error(x, weight, flex_scales(act, w, a, b), act_scope)

    stage1 = min(cost(a, 1 - a) for a in GRID)
    best = min([stage1] + [cost(result.alpha, b) for b in GRID])
    assert result.error == pytest.approx(best)
    assert result.error == pytest.approx(cost(result.alpha, result.beta))
    no_smoothing = quantized_error(x, weight, torch.ones(48), act_scope)
    assert result.error < 0.5 * no_smoothing
    assert result.error <= cost(0.5, 0.5) + 1e-9


def test_flex_keeps_given_exponents():
    x, weight = _outlier_layer()
    act, w = x.abs().amax(0), weight.abs().amax(0)
    result = search_alpha_beta(x, weight, lambda a, b: flex_scales(act, w, a, b), "per_token", alpha=0.3, beta=0.6)
    assert (result.alpha, result.beta) == (0.3, 0.6)


@pytest.mark.parametrize("first", [{"type": "iter_smooth"}, {"type": "quarot"}])
def test_a_group_refuses_a_rewrite_before_a_step_that_calibrates_in_the_same_forward(first, tiny_llama, tmp_path):
    """In one group every child sees the same calibration forward: a static linear_quant after a smoothing or a
    rotation there would take its ranges from activations the rewrite then changes."""
    static = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": [{"type": "group", "configs": [first, static]}], "dataset": small_calib(tmp_path)}}))
    with pytest.raises(ConfigError, match=r"group\.configs\[0\] \(\w+\) changes the activations .* put \w+ before "
                                          r"the group"):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
