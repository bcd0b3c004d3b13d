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
    limit = 0.15 if scheme == "w8a8_static" else 0.05 if "w8" in scheme else 0.8 if scheme == "w4a4_dynamic" else 0.5
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


def test_w4a4_dynamic_layout_and_refusals(models, tmp_path):
    """formats.md A.4.7: int4 codes one per int8 byte, f32 [N, 1] scales, zero offsets; per-group weights and the
    compressed-tensors format (no vLLM kernel) are refused before any weight is read."""
    import yaml

    from msmodelslim.core.errors import ConfigError, UnsupportedError
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    out = tmp_path / "out"
    run_quant(models["llama"], out, write_config(tmp_path / "c.yaml", SCHEMES["w4a4_dynamic"]), MODEL_TYPE["llama"])
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W4A4_DYNAMIC"
    (shard,) = out.glob("*.safetensors")
    with safe_open(shard, "pt") as f:
        p = "model.layers.0.mlp.down_proj"
        weight = f.get_tensor(f"{p}.weight")
        assert weight.dtype == torch.int8 and weight.shape == (64, 128) and int(weight.min()) >= -8 and int(weight.max()) <= 7
        assert f.get_tensor(f"{p}.weight_scale").shape == (64, 1)
        assert not f.get_tensor(f"{p}.weight_offset").any()
    assert [x.message for x in check_ascendv1(out) if x.level == "error"] == []

    grouped = {**SCHEMES["w4a4_dynamic"], "weight": {**SCHEMES["w4a4_dynamic"]["weight"], "scope": "per_group",
                                                    "ext": {"group_size": 16}}}
    with pytest.raises(ConfigError, match="per-group int4 weights does not load"):
        run_quant(models["llama"], tmp_path / "g", write_config(tmp_path / "g.yaml", grouped), MODEL_TYPE["llama"])
    config = yaml.safe_load(write_config(tmp_path / "ct.yaml", SCHEMES["w4a4_dynamic"]).read_text())
    config["spec"]["save"] = [{"type": "compressed_tensors"}]
    (tmp_path / "ct.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UnsupportedError, match="int4 per-token activations"):
        run_quant(models["llama"], tmp_path / "ct", tmp_path / "ct.yaml", MODEL_TYPE["llama"])
    assert not (tmp_path / "g").exists() and not (tmp_path / "ct").exists()
