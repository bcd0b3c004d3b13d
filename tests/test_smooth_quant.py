"""SmoothQuant: float-exact before quantization, better than round to nearest on planted outliers."""
import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, STATIC_W8A8_STEP, outputs_of_both_runners, run_quant, small_calib
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.interface import AttentionShape
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.linear_quant.processor import InputRecord, linear_to_ir
from msmodelslim.processor.smooth_quant import smooth
from msmodelslim.quantizer.observer import MinMaxObserver
from tiny_models import make_tiny_model

ALL_SUBGRAPHS = ["norm-linear", "ov", "up-down"]


def smooth_config(path, alpha=0.5, then=None, runner="layer_wise", dataset=None):
    process = [{"type": "smooth_quant", "alpha": alpha, "enable_subgraph_type": ALL_SUBGRAPHS}]
    if then:
        process.append(then)
    spec = {"runner": runner, "process": process, "dataset": dataset}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_smoothing_alone_leaves_the_float_model_unchanged(tmp_path, family):
    source = make_tiny_model(tmp_path / "src", family, seed=3)
    with torch.no_grad():  # plant outlier channels so the scales are far from 1
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[5] *= 25
        model.save_pretrained(source)
    out = tmp_path / "out"
    run_quant(source, out, smooth_config(tmp_path / "c.yaml", dataset=small_calib(tmp_path)),
              {"llama": "Llama-2-7B", "qwen2": "Qwen2-7B", "qwen3": "Qwen3-8B"}[family])
    smoothed = load_ascendv1(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, smoothed(input_ids=ids).logits
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    changed = smoothed.model.layers[0].input_layernorm.weight
    assert not torch.allclose(changed, model.model.layers[0].input_layernorm.weight), "nothing was smoothed"


def test_gqa_scales_are_shared_within_a_kv_group():
    shape = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=3)
    per_head = torch.arange(12, dtype=torch.float32)
    kv = smooth.to_kv_channels(per_head, shape)
    assert kv.tolist() == [3, 4, 5, 9, 10, 11]
    assert smooth.from_kv_channels(kv, shape).tolist() == [3, 4, 5, 3, 4, 5, 9, 10, 11, 9, 10, 11]


def test_scales_follow_the_formula():
    act, weight = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smooth.smoothing_scales(act, weight, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0]))


def test_smoothing_beats_round_to_nearest_on_planted_outliers():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, [7, 40]] *= 60  # two outlier channels, as in real LLM activations
    linear = nn.Linear(64, 32, bias=False)
    config = LinearQuantConfig(type="linear_quant", qconfig=SCHEMES["w8a8_static"])

    def quantized_error(lin, inputs):
        record = InputRecord(MinMaxObserver())
        record.update(inputs)
        ir = linear_to_ir(lin, config, record)
        return (ir(inputs) - linear(x)).pow(2).mean().item()

    plain = quantized_error(linear, x)
    s = smooth.smoothing_scales(x.abs().amax(0), smooth.column_absmax([linear.weight]), alpha=0.5)
    smoothed = nn.Linear(64, 32, bias=False)
    smoothed.weight.data = linear.weight.data * s
    assert torch.allclose(smoothed(x / s), linear(x), atol=1e-4)
    assert quantized_error(smoothed, x / s) < plain / 4


def test_layer_wise_equals_model_wise_with_smoothing(tiny_qwen2, tmp_path):
    process = [{"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ALL_SUBGRAPHS}, STATIC_W8A8_STEP]
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, process, "Qwen2-7B")
    assert layer_wise == model_wise


def test_smooth_quant_after_linear_quant_is_an_error(tiny_llama, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"dataset": small_calib(tmp_path), "process": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a16"]}, {"type": "smooth_quant"}]}}))
    with pytest.raises(ConfigError, match=r"spec: process\[1\] \(smooth_quant\) comes after process\[0\]"):
        run_quant(tiny_llama, tmp_path / "o", path)
