"""compressed-tensors output: transformers (with the compressed-tensors library) loads it and computes what our
own ascendv1 reader computes for the same quantization; packing matches a scalar reference."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear

DYNAMIC = {"w8a8_dynamic", "w4a8_dynamic"}


def quantize_both(source, tmp_path, scheme, model_type="Llama-2-7B"):
    calib = small_calib(tmp_path)
    outs = {}
    for saver in ("ascendv1_saver", "compressed_tensors"):
        config = tmp_path / f"{saver}.yaml"
        config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
            "runner": "layer_wise", "dataset": calib, "save": [{"type": saver}],
            "process": [{"type": "linear_quant", "qconfig": SCHEMES[scheme], "exclude": ["lm_head"]}]}}))
        outs[saver] = tmp_path / saver
        run_quant(source, outs[saver], config, model_type)
    return outs["ascendv1_saver"], outs["compressed_tensors"]


def per_token_127_5(x):
    """compressed-tensors' own emulation of dynamic int8 activations: scale max|x|/127.5 (vLLM's kernel, and
    our reader, use /127)."""
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def logits(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8_static", "w8a8_dynamic", "w4a16_g16", "w4a16_channel", "w4a8_dynamic"])
def test_transformers_loads_our_output_and_agrees_with_our_reader(tiny_llama, tmp_path, scheme):
    ascend_dir, ct_dir = quantize_both(tiny_llama, tmp_path, scheme)
    ours = load_ascendv1(ascend_dir)
    theirs = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, local_files_only=True)
    if scheme in DYNAMIC:  # emulate with the library's grid to compare the stored weights exactly
        for module in ours.modules():
            if isinstance(module, QuantLinear):
                module.quantize_input = per_token_127_5
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-4, rtol=1e-4)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert not torch.allclose(logits(float_model), logits(theirs), atol=1e-4), "nothing was quantized"
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert "lm_head" in config["ignore"]
    expected_format = "pack-quantized" if scheme in ("w8a16", "w4a16_g16", "w4a16_channel") else "int-quantized"
    assert config["format"] == expected_format


def test_generation_runs_on_the_loaded_checkpoint(tiny_llama, tmp_path):
    _, ct_dir = quantize_both(tiny_llama, tmp_path, "w4a16_g16")
    model = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, local_files_only=True)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def _scalar_pack(q, bits):
    """Row by row: element k at bit k·b of the row's 32-bit words, value q + 2^(b-1) (formats.md B.4)."""
    rows, cols = q.shape
    words = (cols * bits + 31) // 32
    out = torch.zeros(rows, words, dtype=torch.int64)
    for r in range(rows):
        for k in range(cols):
            value = int(q[r, k]) + (1 << (bits - 1))
            out[r, (k * bits) // 32] |= value << ((k * bits) % 32)
    return out


@pytest.mark.parametrize("scheme,bits", [("w4a16_g16", 4), ("w8a16", 8)])
def test_packed_weights_match_a_scalar_reference(tiny_llama, tmp_path, scheme, bits):
    ascend_dir, ct_dir = quantize_both(tiny_llama, tmp_path, scheme)
    ours = load_ascendv1(ascend_dir)
    codes = ours.model.layers[1].mlp.down_proj.qweight
    tensors = load_file(ct_dir / "model.safetensors")
    packed = tensors["model.layers.1.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32
    assert torch.equal(packed.to(torch.int64) & 0xFFFFFFFF, _scalar_pack(codes, bits))
    assert tensors["model.layers.1.mlp.down_proj.weight_shape"].tolist() == list(codes.shape)
    assert "model.layers.1.mlp.down_proj.weight_zero_point" not in tensors  # symmetric: no zero points


def test_tied_bf16_model_embeddings_written_once_scales_float32(tiny_qwen3_bf16_tied, tmp_path):
    ascend_dir, ct_dir = quantize_both(tiny_qwen3_bf16_tied, tmp_path, "w8a8_static", "Qwen3-8B")
    tensors = load_file(ct_dir / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32  # declared scale_dtype
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    theirs = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, local_files_only=True)
    assert torch.equal(theirs.lm_head.weight, theirs.model.embed_tokens.weight)
    ours = load_ascendv1(ascend_dir)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-4, rtol=1e-4)


def test_quarot_output_is_untied_in_compressed_tensors(tmp_path):
    from tiny_models import make_tiny_model

    source = make_tiny_model(tmp_path / "src", "llama", tie=True, seed=4)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"save": [{"type": "compressed_tensors"}],
        "process": [{"type": "quarot"}, {"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "exclude": ["lm_head"]}]}}))
    run_quant(source, tmp_path / "out", config)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, local_files_only=True)
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert (logits(model) - logits(float_model)).abs().max() < 0.1


@pytest.mark.parametrize("scheme", ["w8a8_static", "w4a16_g16"])
def test_convert_ascendv1_to_compressed_tensors(tiny_qwen2, tmp_path, scheme):
    from msmodelslim.cli.__main__ import main

    ascend_dir, direct_dir = quantize_both(tiny_qwen2, tmp_path, scheme, "Qwen2-7B")
    converted = tmp_path / "converted"
    assert main(["convert", "--model_path", str(ascend_dir), "--save_path", str(converted)]) == 0
    assert not (converted / "quant_model_description.json").exists()
    theirs = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, local_files_only=True)
    assert torch.allclose(logits(load_ascendv1(ascend_dir)), logits(theirs), atol=1e-4, rtol=1e-4)
    direct = load_file(direct_dir / "model.safetensors")
    converted_tensors = load_file(converted / "model.safetensors")
    assert converted_tensors.keys() == direct.keys()
    for name, tensor in converted_tensors.items():  # what quantizing straight to this format writes
        if name.endswith("weight_scale"):  # W8A8 scales pass through ascendv1's deq_scale = s_in * s_w
            assert torch.allclose(tensor, direct[name], rtol=1e-6, atol=0), name
        elif name.endswith("bias") and scheme == "w8a8_static":  # ascendv1 folds it into int32 quant_bias
            assert torch.allclose(tensor, direct[name], atol=1e-3), name
        else:
            assert torch.equal(tensor, direct[name]), name
    assert main(["convert", "--model_path", str(ascend_dir), "--save_path", str(converted)]) == 3  # not empty
    assert main(["convert", "--model_path", str(tmp_path / "nope"), "--save_path", str(tmp_path / "x")]) == 2
