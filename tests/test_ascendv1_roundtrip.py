"""Every scheme, saved and read back two ways: msmodelslim's reader and an independent reference reader.

The saved integers must equal round-to-nearest of the original weights, the two readers must compute the same
model, and the quantized model must stay close to the float one.
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import MODEL_TYPE, SCHEMES, run_quant, small_calib, write_config
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.primitives import dequantize_weight, quantize_weight_minmax
from reference_reader import load_reference_model

CASES = [(family, scheme) for family in ("llama", "qwen2", "qwen3") for scheme in SCHEMES]


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2, tiny_qwen3_bf16_tied):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3_bf16_tied}


@pytest.mark.parametrize("family,scheme", CASES)
def test_round_trip(models, tmp_path, family, scheme):
    source = models[family]
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", SCHEMES[scheme], dataset=small_calib(tmp_path))
    report = run_quant(source, out, config, MODEL_TYPE[family])
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["lm_head.weight"] == "FLOAT" and description["model.embed_tokens.weight"] == "FLOAT"

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = load_ascendv1(out)
    reference = load_reference_model(out)
    quantized_layers = 0
    for name, module in ours.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        quantized_layers += 1
        w = original.get_submodule(name).weight.detach()
        bits = module.weight_bits
        symmetric = not bool(module.weight_offset.abs().sum() > 0)
        q, s, o = quantize_weight_minmax(w, bits, symmetric, module.group_size)
        assert torch.equal(module.qweight, q), f"{name}: integer codes differ from round-to-nearest"
        assert torch.allclose(module.dequantized_weight(), dequantize_weight(q, s, o), rtol=1e-6, atol=1e-9), name
        assert torch.allclose(reference.get_submodule(name).weight, module.dequantized_weight(), rtol=1e-6, atol=1e-9)
    assert quantized_layers == sum(1 for v in report.plan.values() if v != "FLOAT") > 0

    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = original(input_ids=ids).logits
        our_logits = ours(input_ids=ids).logits
        ref_logits = reference(input_ids=ids).logits
    assert torch.allclose(our_logits, ref_logits, atol=1e-4, rtol=1e-4), "the two readers disagree"
    relative = (our_logits - float_logits).norm() / float_logits.norm()
    # Static ranges come from 6 short calibration texts while the probe is random tokens: clipping is expected.
    limit = 0.15 if scheme == "w8a8_static" else 0.05 if "w8" in scheme else 0.5
    assert relative < limit, f"quantized model drifted {relative:.3f} from float"


def test_tensor_layouts_for_w8a8_static_fp32_and_bf16(models, tmp_path):
    for family, deq_dtype in (("llama", torch.int64), ("qwen3", torch.float32)):
        out = tmp_path / family
        config = write_config(tmp_path / f"{family}.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
        run_quant(models[family], out, config, MODEL_TYPE[family])
        (shard,) = out.glob("quant_model_weights-00001-of-00001.safetensors")
        p = "model.layers.0.self_attn.q_proj"
        with safe_open(shard, "pt") as f:
            weight, deq = f.get_tensor(f"{p}.weight"), f.get_tensor(f"{p}.deq_scale")
            assert weight.dtype == torch.int8 and weight.shape == (64, 64)
            assert deq.dtype == deq_dtype and deq.shape == (64,)
            assert f.get_tensor(f"{p}.quant_bias").dtype == torch.int32
            assert f.get_tensor(f"{p}.input_scale").shape == (1,)
            assert f.get_tensor(f"{p}.input_offset").shape == (1,)
            assert f.get_tensor("model.norm.weight").dtype == (torch.bfloat16 if family == "qwen3" else torch.float32)


def test_w8a8_static_bias_is_folded_into_quant_bias(models, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
    run_quant(models["qwen2"], out, config, "Qwen2-7B")
    original = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.float32)
    ours = load_ascendv1(out)
    for proj in ("q_proj", "k_proj", "v_proj"):
        layer = ours.get_submodule(f"model.layers.1.self_attn.{proj}")
        true_bias = original.get_submodule(f"model.layers.1.self_attn.{proj}").bias
        deq = layer.input_scale * layer.weight_scale[:, 0]
        assert bool(((layer.bias - true_bias).abs() <= deq / 2 + 1e-7).all())
