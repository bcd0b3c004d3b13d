"""Reading compressed-tensors back (format/compressed_tensors/reader.py): `msmodelslim eval` scores a
compressed-tensors checkpoint as it scores ascendv1.

- One run saves both formats; the compressed-tensors copy read by the new reader gives the logits of the ascendv1
  copy read by the ascendv1 reader (tested against tests/reference_reader.py elsewhere), for every scheme both
  formats hold, on Llama, Qwen2 (biases), Qwen3 (bf16, tied head) and Qwen3-MoE (experts), with an FP8 KV cache.
- NVFP4, which only compressed-tensors holds: the weights equal what transformers decompresses.
- A llm-compressor-style config (`targets: [Linear]`, `ignore: [lm_head]`) reads to the same model.
- What it cannot simulate is refused before any tensor is read, naming the group and the field.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.format.compressed_tensors.reader import load_compressed_tensors, read_quantization_config
from msmodelslim.ir.kv_cache import FP8KVCacheQuant
from msmodelslim.ir.quant_linear import QuantLinear

BOTH = [{"type": "ascendv1_saver"}, {"type": "compressed_tensors"}]
FP8 = {"dtype": "fp8_e4m3", "symmetric": True, "method": "minmax"}
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {**MXFP8, "dtype": "mxfp4"}
NVFP4 = {"dtype": "nvfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
QCONFIGS = {
    **{name: SCHEMES[name] for name in ("w8a8_static", "w8a8_dynamic", "w8a16", "w8a16_asym_g16", "w4a16_g16",
                                         "w4a16_channel", "w4a8_dynamic")},
    "fp8_dynamic": {"act": {**FP8, "scope": "per_token"}, "weight": {**FP8, "scope": "per_channel"}},
    "w8a8_mxfp8": {"act": MXFP8, "weight": MXFP8},
    "w4a4_mxfp4": {"act": MXFP4, "weight": MXFP4},
    "w4a16_mxfp4": {"weight": MXFP4},
}
FP8_KV_CACHE = {"type": "dynamic_cache", "qconfig": {"dtype": "fp8_e4m3", "scope": "per_tensor", "symmetric": True,
                                                    "method": "minmax"}}
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 128, 31, 200]])


def quantize_both(source, tmp_path, qconfig, model_type="Llama-2-7B", extra=(), save=BOTH):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    process = [{"type": "linear_quant", "qconfig": qconfig, "exclude": ["lm_head"]}, *extra]
    spec = {"runner": "layer_wise", "dataset": small_calib(tmp_path), "process": process, "save": save}
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    out = tmp_path / "out"
    run_quant(source, out, config, model_type=model_type)
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.double()


def assert_same_model(ours, reference) -> None:
    """Same quantized layers with the same scheme, decoded weight and output on the same input, and the same logits.
    Static W8A8 in ascendv1 stores deq_scale = s_in·s_w, from which its reader recovers s_w to an ulp; such a
    difference can flip an int8 code of a later layer's input, so whole-model logits are compared only where both
    formats hold the same scales."""
    layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    read = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert read.keys() == layers.keys() and layers
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        assert read[name].scheme == layer.scheme, name
        torch.testing.assert_close(read[name].dequantized_weight(), layer.dequantized_weight(), rtol=1e-6, atol=1e-7)
        x = torch.randn(5, layer.in_features, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(read[name](x), layer(x), rtol=1e-5, atol=1e-6)
    if all(torch.equal(read[n].weight_scale, layer.weight_scale) for n, layer in layers.items()):
        a, b = logits(ours), logits(reference)
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.mark.parametrize("scheme", sorted(QCONFIGS))
def test_each_scheme_reads_to_the_ascendv1_copys_model(tiny_llama, tmp_path, scheme):
    out = quantize_both(tiny_llama, tmp_path, QCONFIGS[scheme])
    assert_same_model(load_compressed_tensors(out / "compressed_tensors"), load_ascendv1(out / "ascendv1"))


@pytest.mark.parametrize("family", ["qwen2", "qwen3_bf16_tied", "qwen3_moe"])
def test_families_read_to_the_ascendv1_copys_model(request, tmp_path, family):
    source = request.getfixturevalue(f"tiny_{family}")
    model_type = {"qwen2": "Qwen2.5-7B-Instruct", "qwen3_bf16_tied": "Qwen3-8B", "qwen3_moe": "Qwen3-30B-A3B"}[family]
    out = quantize_both(source, tmp_path, QCONFIGS["w8a8_dynamic"], model_type=model_type)
    assert_same_model(load_compressed_tensors(out / "compressed_tensors"), load_ascendv1(out / "ascendv1"))


def test_an_fp8_kv_cache_is_simulated_with_its_saved_scales(tiny_llama, tmp_path):
    out = quantize_both(tiny_llama, tmp_path, QCONFIGS["fp8_dynamic"], extra=[FP8_KV_CACHE],
                        save=[{"type": "compressed_tensors"}])
    model = load_compressed_tensors(out)
    caches = [m for m in model.modules() if isinstance(m, FP8KVCacheQuant)]
    assert len(caches) == 2
    saved = load_file(out / "model.safetensors")
    assert float(caches[0].key_scale) == float(saved["model.layers.0.self_attn.k_scale"])
    without = tmp_path / "without_cache"
    shutil.copytree(out, without)
    config = json.loads((without / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = None
    (without / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError, match="not match the model architecture"):
        load_compressed_tensors(without)  # scales nothing reads are not silently dropped
    assert not torch.equal(logits(model), logits(load_compressed_tensors(quantize_both(
        tiny_llama, tmp_path / "plain", QCONFIGS["fp8_dynamic"], save=[{"type": "compressed_tensors"}]))))


@pytest.mark.parametrize("act", [False, True])
def test_nvfp4_weights_are_what_transformers_decompresses(tiny_llama, tmp_path, act):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    qconfig = {"act": NVFP4, "weight": NVFP4} if act else {"weight": NVFP4}
    out = quantize_both(tiny_llama, tmp_path / "run", qconfig, save=[{"type": "compressed_tensors"}])
    ours = load_compressed_tensors(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.scheme.value == ("W4A4_NVFP4" if act else "W4A16_NVFP4")
        torch.testing.assert_close(layer.dequantized_weight(), theirs.get_submodule(name).weight.float(),
                                   rtol=1e-2, atol=1e-6)  # the library decompresses through bf16
    if not act:
        a, b = logits(ours), logits(theirs)
        assert float((a - b).abs().max() / b.abs().max()) < 2e-2


def test_class_targets_and_ignore_read_as_llm_compressor_writes_them(tiny_llama, tmp_path):
    out = quantize_both(tiny_llama, tmp_path, QCONFIGS["w8a8_dynamic"], save=[{"type": "compressed_tensors"}])
    exact = load_compressed_tensors(out)
    config = json.loads((out / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    group["targets"] = ["Linear"]
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError, match="not match the model architecture"):
        load_compressed_tensors(out)  # layers.1's down_proj is quantized on disk but now ignored
    config["quantization_config"]["ignore"] = ["lm_head"]
    (out / "config.json").write_text(json.dumps(config))
    assert_same_model(load_compressed_tensors(out), exact)
    # `msmodelslim check` matches a class target against modules, not tensor names: no false "Linear lacks weight"
    from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors

    assert not [f.message for f in check_compressed_tensors(out) if f.level == "error"]


def _rewrite(out, edit) -> None:
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


def _group(q: dict) -> dict:
    (group,) = q["config_groups"].values()
    return group


@pytest.mark.parametrize("scheme,edit,words", [
    ("fp8_dynamic", lambda q: q.update(transform_config={"config_groups": {"u": {"type": "hadamard"}}}),
     "transform_config"),
    ("fp8_dynamic", lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
     "strategy tensor, dynamic False"),
    ("fp8_dynamic", lambda q: _group(q)["weights"].update(strategy="block", block_structure=[16, 16]),
     "weights.strategy 'block'"),
    ("w4a16_g16", lambda q: _group(q)["weights"].update(actorder="group"), "actorder='group' has been removed"),
    ("w8a8_dynamic", lambda q: _group(q)["input_activations"].update(symmetric=False), "symmetric False"),
    ("w4a16_mxfp4", lambda q: _group(q).update(input_activations={"num_bits": 8, "type": "float", "strategy": "token",
                                                                  "dynamic": True}),
     "mxfp4-pack-quantized weights with float 8-bit inputs"),
    ("fp8_dynamic", lambda q: _group(q).update(format="marlin-24"), "format 'marlin-24'"),
    ("fp8_dynamic", lambda q: q.update(quant_method="gptq"), "not a compressed-tensors checkpoint"),
])
def test_what_it_cannot_simulate_is_refused_by_name(tiny_llama, tmp_path, scheme, edit, words):
    out = quantize_both(tiny_llama, tmp_path, QCONFIGS[scheme], save=[{"type": "compressed_tensors"}])
    _rewrite(out, edit)
    with pytest.raises(InvalidModelError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_quantization_config(out)


def test_eval_scores_a_compressed_tensors_checkpoint(tiny_llama, tmp_path, monkeypatch):
    from msmodelslim.app.evaluate import evaluate

    out = quantize_both(tiny_llama, tmp_path, QCONFIGS["w8a8_dynamic"])
    texts = tmp_path / "eval.txt"
    texts.write_text("Quantization maps floating point values onto integers. " * 40)
    results = {layout: evaluate(tiny_llama, out / layout, str(texts), torch.device("cpu"), window=32, max_windows=4)
               for layout in ("ascendv1", "compressed_tensors")}
    a, b = results["ascendv1"]["quantized"].perplexity, results["compressed_tensors"]["quantized"].perplexity
    assert abs(a - b) / a < 1e-5
    assert results["compressed_tensors"]["quantized"].perplexity != results["compressed_tensors"]["float"].perplexity
    shard = out / "compressed_tensors" / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, shard)
    monkeypatch.setattr("msmodelslim.app.evaluate.load_float_model", lambda *a: pytest.fail("float model loaded"))
    with pytest.raises(InvalidModelError, match="model.layers.1.mlp.up_proj .* lacks tensor\\(s\\) weight_scale"):
        evaluate(tiny_llama, out / "compressed_tensors", str(texts), torch.device("cpu"), window=32, max_windows=4)
