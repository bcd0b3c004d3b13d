"""NVFP4 (dtype nvfp4, W4A16_NVFP4 / W4A4_NVFP4, compressed-tensors only): codes and scales against a slow scalar
reference and against compressed-tensors' own scale computation; run-time activation quantization against the
library's own (dynamic local, tensor_group 16); the checkpoint read back independently (safetensors + the
library's NVFP4 decompressor, and transformers decompressing on the CPU) gives exactly our weights; GPTQ on the
NVFP4 grid beats round to nearest on the layer output; the refusals come before any weight is read."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import run_quant, small_calib
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.quantizer.float_formats import decode_fp4_e2m1
from msmodelslim.quantizer.nvfp4 import dequantize_nvfp4, quantize_weight_nvfp4

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4 = {"dtype": "nvfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # one float32 rounding


def round_e2m1(x: float) -> float:
    magnitude = min(abs(x), 6.0)
    index = min(range(len(GRID)), key=lambda i: (abs(GRID[i] - magnitude), i % 2))
    return math.copysign(GRID[index], x) if GRID[index] else 0.0


def reference(w: torch.Tensor, amax: float | None = None) -> tuple[list[list[float]], list[list[float]], float]:
    """(elements, block scales, g) element by element, every float32 operation rounded as the library does it."""
    amax = float(w.abs().max()) if amax is None else amax
    g = f32(448.0 * 6.0 / amax) if amax > 0 else 1.0
    elements, scales = [], []
    for row in w.tolist():
        row_elements, row_scales = [], []
        for b in range(0, len(row), 16):
            block = row[b:b + 16]
            s = float(torch.tensor(f32(g * f32(max(abs(v) for v in block) / 6.0))).to(torch.float8_e4m3fn).float())
            s = 0.125 if s == 0 else s
            effective = f32(s / g)
            row_scales.append(s)
            row_elements += [round_e2m1(f32(v / effective)) for v in block]
        elements.append(row_elements)
        scales.append(row_scales)
    return elements, scales, g


def test_codes_and_scales_match_the_scalar_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=g) * torch.logspace(-4, 0, 128)  # block maxima over four decades
    w[2, :16] = 0  # an all-zero block
    w[3, 16:32] = 1e-7  # a block whose FP8 scale underflows to 0
    codes, scale, gs = quantize_weight_nvfp4(w)
    elements, scales, g_ref = reference(w)
    assert gs.tolist() == [g_ref]
    assert scale.tolist() == scales
    assert decode_fp4_e2m1(codes).tolist() == elements
    assert scale.max().item() == 448.0  # the block holding max|W| uses the top of FP8's range
    shared = quantize_weight_nvfp4(w, amax=torch.tensor(3.0))  # a fused group's larger max|W|
    assert shared[2].tolist() == [reference(w, 3.0)[2]] and shared[1].tolist() == reference(w, 3.0)[1]


def test_scales_match_compressed_tensors_own_computation():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                            scale_dtype=torch.float8_e4m3fn)
    g = generate_gparam(w.min(), w.max())
    blocks = w.reshape(16, -1, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
    _, ours, g_ours = quantize_weight_nvfp4(w)
    assert torch.equal(g_ours, g.float())
    assert torch.equal(ours, scale.float())


@pytest.fixture(scope="module")
def nvfp4_checkpoint(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("nvfp4") / "out"
    config = out.parent / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": {"weight": NVFP4}, "exclude": ["lm_head"]}]}}))
    run_quant(tiny_qwen2, out, config, "Qwen2.5-7B-Instruct")
    return out


def expected_weights(source) -> dict[str, torch.Tensor]:
    """Our NVFP4 weights of the original model, q/k/v and gate/up sharing their group's global scale."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    out = {}
    for layer in range(original.config.num_hidden_layers):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                      ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)):
            names = [f"model.layers.{layer}.{m}" for m in group]
            amax = max(original.get_submodule(n).weight.abs().max() for n in names)
            for n in names:
                codes, scale, g = quantize_weight_nvfp4(original.get_submodule(n).weight, amax)
                out[n] = dequantize_nvfp4(decode_fp4_e2m1(codes), scale, g)
    return out


def test_layout_and_the_library_decompressor_give_our_weights(tiny_qwen2, nvfp4_checkpoint):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    quantization = json.loads((nvfp4_checkpoint / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "nvfp4-pack-quantized"
    (group,) = quantization["config_groups"].values()
    assert (group["weights"]["type"], group["weights"]["strategy"], group["weights"]["group_size"]) == (
        "float", "tensor_group", 16)
    assert group["input_activations"] is None and "lm_head" in quantization["ignore"]
    scheme = QuantizationScheme.model_validate({**group, "targets": ["Linear"]})
    tensors = load_file(next(nvfp4_checkpoint.glob("*.safetensors")))
    expected = expected_weights(tiny_qwen2)
    for name, weight in expected.items():
        own = {s: tensors[f"{name}.{s}"] for s in ("weight_packed", "weight_scale", "weight_global_scale")}
        n, k = weight.shape
        assert (own["weight_packed"].dtype, list(own["weight_packed"].shape)) == (torch.uint8, [n, k // 2])
        assert (own["weight_scale"].dtype, list(own["weight_scale"].shape)) == (torch.float8_e4m3fn, [n, k // 16])
        assert (own["weight_global_scale"].dtype, list(own["weight_global_scale"].shape)) == (torch.float32, [1])
        theirs = NVFP4PackedCompressor.decompress(own, scheme)["weight"]
        assert torch.equal(theirs, weight.to(theirs.dtype)), name  # the decompressor's dtype (bf16)
    p = "model.layers.0.self_attn"
    assert torch.equal(tensors[f"{p}.q_proj.weight_global_scale"], tensors[f"{p}.v_proj.weight_global_scale"])
    assert f"{p}.q_proj.bias" in tensors  # Qwen2's q/k/v bias stays as it is


def test_transformers_decompresses_it_on_the_cpu(tiny_qwen2, nvfp4_checkpoint):
    """transformers (compressed-tensors 0.20) keeps NVFP4 layers compressed by default, with no `weight` to run on
    the CPU; `dequantize=True` decompresses them to exactly our weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(nvfp4_checkpoint, dtype=torch.float32, local_files_only=True,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, weight in expected_weights(tiny_qwen2).items():
        loaded = model.get_submodule(name).weight
        assert torch.equal(loaded, weight.to(torch.bfloat16).to(loaded.dtype)), name
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_gptq_on_the_nvfp4_grid_beats_round_to_nearest():
    from msmodelslim.quantizer.gptq import accumulate_hessian, gptq_quantize_nvfp4
    from test_weight_methods import correlated_inputs

    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.1
    x = correlated_inputs(512, 128)
    h, _ = accumulate_hessian(None, 0, x)
    outputs = {}
    for name, (codes, scale, g) in {"rtn": quantize_weight_nvfp4(w), "gptq": gptq_quantize_nvfp4(w, h)}.items():
        outputs[name] = float(((x @ (dequantize_nvfp4(decode_fp4_e2m1(codes), scale, g) - w).T) ** 2).mean())
        assert g.tolist() == quantize_weight_nvfp4(w)[2].tolist()  # the global scale of the original weight
    assert outputs["gptq"] < 0.8 * outputs["rtn"]


def test_gptq_nvfp4_end_to_end(tiny_llama, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": small_calib(tmp_path), "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": {"weight": {**NVFP4, "method": "gptq"}},
                     "exclude": ["lm_head"]}]}}))
    run_quant(tiny_llama, tmp_path / "out", config)
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert tensors["model.layers.1.mlp.down_proj.weight_packed"].dtype == torch.uint8


def _save(tmp_path, qconfig: dict, saver: str):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "save": [{"type": saver}],
        "process": [{"type": "linear_quant", "qconfig": qconfig, "exclude": ["lm_head"]}]}}))
    return config


@pytest.mark.parametrize("qconfig,saver,error,needle", [
    ({"weight": NVFP4}, "ascendv1_saver", UnsupportedError, "W4A16_NVFP4, which ascendv1_saver cannot hold: dtype nvfp4"),
    ({"act": NVFP4, "weight": NVFP4}, "ascendv1_saver", UnsupportedError, "W4A4_NVFP4, which ascendv1_saver cannot hold"),
    ({"act": NVFP4, "weight": {**NVFP4, "dtype": "mxfp4"}}, "compressed_tensors", ConfigError, "no deployable kernel"),
    ({"weight": {**NVFP4, "scope": "per_channel"}}, "compressed_tensors", ConfigError, "dtype nvfp4 takes scope per_block"),
    ({"weight": {**NVFP4, "method": "ssz"}}, "compressed_tensors", ConfigError, "takes method minmax or gptq"),
])
def test_refusals_before_any_weight_is_read(tiny_llama, tmp_path, qconfig, saver, error, needle):
    with pytest.raises(error, match=needle):
        run_quant(tiny_llama, tmp_path / "out", _save(tmp_path, qconfig, saver))
    assert not (tmp_path / "out").exists()


def test_input_sizes_must_be_whole_blocks_of_16(tmp_path):
    from tiny_models import make_tiny_model

    source = make_tiny_model(tmp_path / "m", "llama", intermediate_size=72)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj \(72\) to be a multiple of the NVFP4 block 16"):
        run_quant(source, tmp_path / "out", _save(tmp_path, {"weight": NVFP4}, "compressed_tensors"))
    assert not (tmp_path / "out").exists()


def test_activations_match_the_scalar_reference_and_the_library():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from msmodelslim.quantizer.nvfp4 import fake_quantize_act_nvfp4, global_scale

    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4)) * 2
    g = global_scale(x.abs().max() * 0.8)  # calibrated on smaller inputs: the largest blocks saturate
    ours = fake_quantize_act_nvfp4(x, g)
    for token, row in zip(ours.reshape(-1, 64), x.reshape(-1, 64)):
        elements, scales, _ = reference(row.unsqueeze(0), amax=float(x.abs().max() * 0.8))
        expected = [f32(v * f32(scales[0][i // 16] / float(g))) for i, v in enumerate(elements[0])]
        assert token.tolist() == expected
    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                            dynamic="local", scale_dtype=torch.float8_e4m3fn)
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=g)
    assert torch.equal(ours, fake_quantize(x, scale, zero, args, global_scale=g))


def test_w4a4_checkpoint(tiny_llama, tmp_path):
    """The NVFP4 preset's layout: input_activations float 4-bit tensor_group 16, dynamic local, and a positive
    input_global_scale per layer, one value for layers reading the same input (q/k/v, gate/up); transformers
    decompresses the weights to ours."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": small_calib(tmp_path), "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": {"act": NVFP4, "weight": NVFP4}, "exclude": ["lm_head"]}]}}))
    out = tmp_path / "out"
    run_quant(tiny_llama, out, config)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = quantization["config_groups"].values()
    act = group["input_activations"]
    assert (act["type"], act["num_bits"], act["strategy"], act["group_size"], act["dynamic"]) == (
        "float", 4, "tensor_group", 16, "local")
    tensors = load_file(next(out.glob("*.safetensors")))
    p = "model.layers.0"
    scales = {n: tensors[f"{p}.{n}.input_global_scale"] for n in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert all(s.dtype == torch.float32 and s.shape == (1,) and float(s) > 0 for s in scales.values())
    assert torch.equal(scales["self_attn.q_proj"], scales["self_attn.v_proj"])
    assert torch.equal(scales["mlp.gate_proj"], scales["mlp.up_proj"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, weight in expected_weights(tiny_llama).items():
        loaded = model.get_submodule(name).weight
        assert torch.equal(loaded, weight.to(torch.bfloat16).to(loaded.dtype)), name
