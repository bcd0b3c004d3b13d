"""The floating-point schemes end to end: config -> quantizer -> ascendv1 -> both readers -> checker.

Codes must equal the element formats' round-to-nearest of the original weights, the independent reference
reader (its own E8M0/E2M1 decoding and run-time activation quantizers) must compute what our reader computes,
and the checker must accept the output."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import MODEL_TYPE, run_quant, small_calib, write_config
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.float_formats import quantize_weight_float
from reference_reader import load_reference_model

FP8 = {"dtype": "fp8_e4m3", "symmetric": True, "method": "minmax"}
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {**MXFP8, "dtype": "mxfp4"}
FLOAT_SCHEMES = {
    "W8A8FP8_DYNAMIC": {"act": {**FP8, "scope": "per_token"}, "weight": {**FP8, "scope": "per_channel"}},
    "W8A8_MXFP8": {"act": MXFP8, "weight": MXFP8},
    "W4A8_MXFP": {"act": MXFP8, "weight": MXFP4},
    "W4A4_MXFP4": {"act": MXFP4, "weight": MXFP4},
    "W4A16_MXFP4": {"weight": MXFP4},
}
WEIGHT_DTYPE = {"W8A8FP8_DYNAMIC": "fp8_e4m3", "W8A8_MXFP8": "mxfp8", "W4A8_MXFP": "mxfp4", "W4A4_MXFP4": "mxfp4",
                "W4A16_MXFP4": "mxfp4"}
# relative logit drift from float allowed on random tokens (3 mantissa bits: ~3 % per element on the random
# weights; 4-bit elements far more)
DRIFT = {"W8A8FP8_DYNAMIC": 0.15, "W8A8_MXFP8": 0.15, "W4A8_MXFP": 0.5, "W4A4_MXFP4": 0.6, "W4A16_MXFP4": 0.5}


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen3_bf16_tied, tiny_qwen3_moe):
    return {"llama": (tiny_llama, MODEL_TYPE["llama"]), "qwen3": (tiny_qwen3_bf16_tied, MODEL_TYPE["qwen3"]),
            "qwen3_moe": (tiny_qwen3_moe, "Qwen3-30B-A3B")}


CASES = [("llama", s) for s in FLOAT_SCHEMES] + [("qwen3", "W8A8FP8_DYNAMIC"), ("qwen3", "W4A8_MXFP"),
                                                 ("qwen3_moe", "W8A8_MXFP8"), ("qwen3_moe", "W8A8FP8_DYNAMIC")]


def original_weight(model, name: str) -> torch.Tensor:
    """A linear's float weight; routed experts from transformers' fused [E, 2I, H] / [E, H, I] parameters."""
    match = re.match(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$", name)
    if match is None:
        return model.get_submodule(name).weight.detach()
    experts, e = model.get_submodule(match[1]), int(match[2])
    if match[3] == "down_proj":
        return experts.down_proj[e].detach()
    inter = experts.down_proj.shape[-1]
    return experts.gate_up_proj[e, :inter].detach() if match[3] == "gate_proj" else experts.gate_up_proj[e, inter:].detach()


@pytest.mark.parametrize("family,scheme", CASES)
def test_round_trip(models, tmp_path, family, scheme):
    source, model_type = models[family]
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", FLOAT_SCHEMES[scheme], dataset=small_calib(tmp_path))
    report = run_quant(source, out, config, model_type)
    assert set(report.plan.values()) == {scheme, "FLOAT"}
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == scheme
    assert description["group_size"] == (0 if scheme == "W8A8FP8_DYNAMIC" else 32)
    findings = check_ascendv1(out)
    assert [f.message for f in findings if f.level == "error"] == []

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = load_ascendv1(out)
    reference = load_reference_model(out)
    layers = 0
    for name, module in ours.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        layers += 1
        assert module.scheme.value == scheme
        codes, scale, _ = quantize_weight_float(original_weight(original, name), WEIGHT_DTYPE[scheme])
        assert torch.equal(module.qweight.view(torch.uint8), codes.view(torch.uint8)), f"{name}: codes differ"
        assert torch.equal(module.weight_scale, scale), name
        if ".experts." not in name:  # the reference stacks experts into fused parameters
            assert torch.equal(reference.get_submodule(name).weight, module.dequantized_weight()), name
    assert layers == sum(1 for v in report.plan.values() if v != "FLOAT") > 0

    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = original(input_ids=ids).logits
        our_logits = ours(input_ids=ids).logits
        ref_logits = reference(input_ids=ids).logits
    assert torch.allclose(our_logits, ref_logits, atol=1e-4, rtol=1e-4), "the two readers disagree"
    relative = ((our_logits - float_logits).norm() / float_logits.norm()).item()
    assert relative < DRIFT[scheme], f"quantized model drifted {relative:.3f} from float"


def test_tensor_layouts(models, tmp_path):
    source, model_type = models["llama"]
    p = "model.layers.0.mlp.down_proj"  # [64, 128]
    expected = {"W8A8FP8_DYNAMIC": {"weight": (torch.float8_e4m3fn, (64, 128)), "weight_scale": (torch.float32, (64, 1)),
                                     "weight_offset": (torch.float32, (64, 1))},
                "W8A8_MXFP8": {"weight": (torch.float8_e4m3fn, (64, 128)), "weight_scale": (torch.uint8, (64, 4))},
                "W4A4_MXFP4": {"weight": (torch.uint8, (64, 64)), "weight_scale": (torch.uint8, (64, 4))}}
    for scheme, tensors in expected.items():
        out = tmp_path / scheme
        run_quant(source, out, write_config(tmp_path / f"{scheme}.yaml", FLOAT_SCHEMES[scheme]), model_type)
        (shard,) = out.glob("*.safetensors")
        with safe_open(shard, "pt") as f:
            names = {k for k in f.keys() if k.startswith(p + ".")}
            assert names == {f"{p}.{s}" for s in tensors}
            for suffix, (dtype, shape) in tensors.items():
                t = f.get_tensor(f"{p}.{suffix}")
                assert (t.dtype, tuple(t.shape)) == (dtype, shape), suffix


def test_fp8_dynamic_is_written_with_the_engine_tag_and_the_established_spelling_is_read(models, tmp_path):
    """formats.md A.4.9: vLLM-Ascend loads FP8 dynamic only under W8A8FP8_DYNAMIC; the established writer emits
    WFP8AFP8_DYNAMIC. We write the engine's tag (the checker is silent) and read the other spelling too."""
    source, model_type = models["llama"]
    out = tmp_path / "out"
    run_quant(source, out, write_config(tmp_path / "c.yaml", FLOAT_SCHEMES["W8A8FP8_DYNAMIC"]), model_type)
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        before = load_ascendv1(out)(input_ids=ids).logits
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    assert "W8A8FP8_DYNAMIC" in description.values() and "WFP8AFP8_DYNAMIC" not in description.values()
    assert [f.message for f in check_ascendv1(out) if f.level in ("error", "warning")] == []
    description = {k: ("WFP8AFP8_DYNAMIC" if v == "W8A8FP8_DYNAMIC" else v) for k, v in description.items()}
    path.write_text(json.dumps(description))
    assert any(f.level == "warning" and "W8A8FP8_DYNAMIC" in f.message for f in check_ascendv1(out))
    with torch.no_grad():
        assert torch.equal(load_ascendv1(out)(input_ids=ids).logits, before)
        assert torch.allclose(load_reference_model(out)(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)


def test_checker_flags_broken_mx_tensors(models, tmp_path):
    source, model_type = models["llama"]
    out = tmp_path / "out"
    run_quant(source, out, write_config(tmp_path / "c.yaml", FLOAT_SCHEMES["W4A4_MXFP4"]), model_type)
    (shard,) = out.glob("*.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    p = "model.layers.0.self_attn.q_proj"
    tensors[f"{p}.weight_scale"][0, 0] = 255  # the E8M0 NaN
    tensors[f"{p}.weight_scale"] = tensors[f"{p}.weight_scale"].clone()
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = tensors["model.layers.0.mlp.up_proj.weight_scale"][:, :1].clone()
    save_file(tensors, shard)
    errors = [f.message for f in check_ascendv1(out) if f.level == "error"]
    assert any("255" in e and p in e for e in errors)
    assert any("up_proj" in e and "weight_scale" in e for e in errors)


@pytest.mark.parametrize("qconfig,needle", [
    ({"act": {**FP8, "scope": "per_token"}, "weight": {**MXFP8}}, "no deployable kernel"),
    ({"weight": {**MXFP4, "scope": "per_channel"}}, "dtype mxfp4 takes scope per_block"),
    ({"weight": {**FP8, "scope": "per_channel", "symmetric": False}}, "symmetric: true"),
    ({"weight": {**MXFP8, "method": "ssz"}}, "takes method minmax"),
    ({"act": {**FP8, "scope": "per_tensor"}, "weight": {**FP8, "scope": "per_channel"}}, "no deployable kernel"),
    ({"weight": {**FP8, "scope": "per_channel"}}, "no deployable kernel"),  # FP8 weight-only: no ascendv1 type
])
def test_unsupported_float_configs_are_refused_before_reading(models, tmp_path, qconfig, needle):
    source, model_type = models["llama"]
    with pytest.raises(ConfigError, match=needle):
        run_quant(source, tmp_path / "out", write_config(tmp_path / "c.yaml", qconfig), model_type)
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_fp8_dynamic_loads_in_transformers(models, tmp_path):
    """vLLM's FP8_DYNAMIC layout (float-quantized, channel weights, dynamic token activations): transformers
    decompresses it on the CPU and computes what our ascendv1 reader computes from the same quantization."""
    import yaml

    source, model_type = models["llama"]
    outs = {}
    for saver in ("ascendv1_saver", "compressed_tensors"):
        config = tmp_path / f"{saver}.yaml"
        config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
            "runner": "layer_wise", "save": [{"type": saver}],
            "process": [{"type": "linear_quant", "qconfig": FLOAT_SCHEMES["W8A8FP8_DYNAMIC"], "exclude": ["lm_head"]}]}}))
        outs[saver] = tmp_path / saver
        run_quant(source, outs[saver], config, model_type)
    quantization = json.loads((outs["compressed_tensors"] / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "float-quantized"
    (group,) = quantization["config_groups"].values()
    assert (group["weights"]["type"], group["weights"]["strategy"]) == ("float", "channel")
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    theirs = AutoModelForCausalLM.from_pretrained(outs["compressed_tensors"], dtype=torch.float32, local_files_only=True)
    ours = load_ascendv1(outs["ascendv1_saver"])
    ids = torch.randint(0, theirs.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme,weight", [
    ("W8A8_MXFP8", {**MXFP8, "method": "mse_round"}),
    ("W4A4_MXFP4", {**MXFP4, "method": "ceil_x"}),
    ("W4A16_MXFP4", {**MXFP4, "method": "ceil_x", "ext": {"enable_search": True, "search_step": 1.0}}),
    ("W4A16_MXFP4", {**MXFP4, "method": "fouroversix"}),
    ("W4A4_MXFP4", {**MXFP4, "method": "fouroversix"}),
])
def test_mx_weight_methods_end_to_end(models, tmp_path, scheme, weight):
    """The methods choose other shared exponents; the layout, the readers and the checker are those of minmax."""
    from msmodelslim.quantizer.scheme import QConfig
    from msmodelslim.quantizer.weight import quantize_weight

    source, model_type = models["llama"]
    qconfig = {**FLOAT_SCHEMES[scheme], "weight": weight}
    out = tmp_path / "out"
    run_quant(source, out, write_config(tmp_path / "c.yaml", qconfig), model_type)
    assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours, reference = load_ascendv1(out), load_reference_model(out)
    differs_from_minmax = False
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            w = original.get_submodule(name).weight
            codes, scale, _ = quantize_weight(w, QConfig(**weight))
            assert torch.equal(module.qweight.view(torch.uint8), codes.view(torch.uint8)), name
            assert torch.equal(module.weight_scale, scale), name
            differs_from_minmax |= not torch.equal(scale, quantize_weight_float(w, weight["dtype"])[1])
    assert differs_from_minmax
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_compressed_tensors_refuses_w4a8_mxfp_before_reading(models, tmp_path):
    """The other MX schemes are written (tests/test_compressed_tensors_mx.py); MXFP8 activations over MXFP4
    weights have no compressed-tensors scheme."""
    import yaml

    source, model_type = models["llama"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": FLOAT_SCHEMES["W4A8_MXFP"], "exclude": ["lm_head"]}]}}))
    with pytest.raises(Exception, match="W4A8_MXFP .MXFP4 weights, MXFP8 activations. has no compressed-tensors scheme"):
        run_quant(source, tmp_path / "out", config, model_type)
    assert not (tmp_path / "out").exists()


def test_mx_needs_input_sizes_in_blocks_of_32(tmp_path):
    """A5 quantizes activations per block of 32 at run time: a layer whose input is not whole blocks is refused
    by name before any weight is read (down_proj here, with intermediate size 80)."""
    from tiny_models import make_tiny_model

    source = make_tiny_model(tmp_path / "m", "llama", intermediate_size=80)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj \(80\) to be a multiple of the MX block 32"):
        run_quant(source, tmp_path / "out", write_config(tmp_path / "c.yaml", FLOAT_SCHEMES["W4A16_MXFP4"]))
    assert not (tmp_path / "out").exists()
    run_quant(source, tmp_path / "fp8", write_config(tmp_path / "f.yaml", FLOAT_SCHEMES["W8A8FP8_DYNAMIC"]))
