"""MX schemes in compressed-tensors (W4A16_MXFP4, W4A4_MXFP4, W8A8_MXFP8): the library's MXFP4A16 / MXFP4 / MXFP8
presets in its own packing (`mxfp4-pack-quantized`, `mxfp8-quantized`; E8M0 scales as uint8 bytes).

- The library's CPU decompressors, on codes and scale bytes chosen by hand, give codes · 2^(byte − 127) exactly.
- A written checkpoint read back with safetensors and a slow scalar dequantizer (below) equals, bit for bit, the
  QuantLinear our ascendv1 reader builds from the same quantization.
- transformers (CompressedTensorsConfig(dequantize=True)) loads it, holds exactly those weights, gives our reader's
  logits and generates. Its default route (dequantize=False) keeps the layers compressed and decompresses them on
  the first forward; on a float32 model that forward fails in compressed-tensors 0.20.1 (the MX decompressors
  return bfloat16 weights), so the tests load with dequantize=True, as the NVFP4 tests do.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import run_quant, small_calib
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors
from msmodelslim.ir.quant_linear import QuantLinear

MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {**MXFP8, "dtype": "mxfp4"}
CASES = {  # scheme: (qconfig, the library's preset, format)
    "W4A16_MXFP4": ({"weight": MXFP4}, "MXFP4A16", "mxfp4-pack-quantized"),
    "W4A4_MXFP4": ({"act": MXFP4, "weight": MXFP4}, "MXFP4", "mxfp4-pack-quantized"),
    "W8A8_MXFP8": ({"act": MXFP8, "weight": MXFP8}, "MXFP8", "mxfp8-quantized"),
    # weight methods whose exponents (or codes) are not the OCP rule's: any E8M0 byte must survive the trip
    "W4A16_MXFP4_ceil_x": ({"weight": {**MXFP4, "method": "ceil_x"}}, "MXFP4A16", "mxfp4-pack-quantized"),
    "W4A16_MXFP4_gptq": ({"weight": {**MXFP4, "method": "gptq"}}, "MXFP4A16", "mxfp4-pack-quantized"),
    "W8A8_MXFP8_mse_round": ({"act": MXFP8, "weight": {**MXFP8, "method": "mse_round"}}, "MXFP8", "mxfp8-quantized"),
}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---- the slow reference: one element at a time, from the bytes ----------------------------------------------
def e2m1_value(nibble: int) -> float:
    return -E2M1[nibble & 7] if nibble & 8 else E2M1[nibble & 7]


def reference_dequantize(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """W[n, k] = element(n, k) · 2^(weight_scale[n, k // 32] − 127), in float64, from the stored tensors only:
    an MXFP4 byte holds element 2j in its low nibble and 2j+1 in its high one; MXFP8 elements are E4M3 values."""
    scale = tensors[f"{name}.weight_scale"]
    assert scale.dtype == torch.uint8
    if f"{name}.weight_packed" in tensors:
        packed = tensors[f"{name}.weight_packed"].tolist()
        elements = [[e2m1_value((byte >> shift) & 0xF) for byte in row for shift in (0, 4)] for row in packed]
    else:
        elements = tensors[f"{name}.weight"].double().tolist()  # float8_e4m3fn -> float64 is exact
    scales = scale.tolist()
    rows = [[v * math.ldexp(1.0, scales[n][k // 32] - 127) for k, v in enumerate(row)]
            for n, row in enumerate(elements)]
    return torch.tensor(rows, dtype=torch.float64)


# ---- the library's decompressors on known codes ---------------------------------------------------------------
def test_the_library_decompresses_known_codes_exactly():
    """Codes and scale bytes chosen by hand (every E2M1 code, E4M3 values from 2^-9 to 448, bytes from 2^-7 to 2^13)
    come back from compressed-tensors' own CPU decompressors as codes · 2^(byte − 127), bit for bit."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, MXFP8

    scale_bytes = torch.tensor([[127, 130], [120, 140]], dtype=torch.uint8)
    nibbles = [i % 16 for i in range(128)]  # row 0: codes 0..15 repeated; row 1 the same
    packed = torch.tensor([[nibbles[2 * j] | nibbles[2 * j + 1] << 4 for j in range(32)] for _ in range(2)],
                          dtype=torch.uint8)
    scheme = QuantizationScheme(targets=["Linear"], **MXFP4A16)
    tensors = {"w.weight_packed": packed, "w.weight_scale": scale_bytes}
    theirs = MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale_bytes}, scheme)["weight"]
    expected = reference_dequantize(tensors, "w")
    assert expected[0, :8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # byte 127: 2^0
    assert expected[1, 32 + 7] == 6.0 * 2 ** 13  # byte 140
    assert torch.equal(theirs.double(), expected)

    values = torch.tensor([448.0, -448.0, 1.0, -2.0 ** -9, 0.5, 3.0, 240.0, 0.001953125] * 16).reshape(2, 64)
    codes = values.to(torch.float8_e4m3fn)
    scheme = QuantizationScheme(targets=["Linear"], **MXFP8)
    theirs = MXFP8QuantizationCompressor.decompress({"weight": codes, "weight_scale": scale_bytes}, scheme)["weight"]
    expected = reference_dequantize({"w.weight": codes, "w.weight_scale": scale_bytes}, "w")
    assert expected[1, 32] == 448.0 * 2 ** 13
    assert torch.equal(theirs.double(), expected)


# ---- checkpoints written by us ---------------------------------------------------------------------------------
def _quantize(source, out, qconfig: dict, saver: str, calib: str, model_type: str = "Llama-2-7B"):
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": calib, "save": [{"type": saver}],
        "process": [{"type": "linear_quant", "qconfig": qconfig, "exclude": ["lm_head"]}]}}))
    run_quant(source, out, config, model_type)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tiny_llama, tmp_path_factory):
    """(case, our ascendv1 output, our compressed-tensors output) of the same quantization of tiny Llama."""
    root = tmp_path_factory.mktemp(request.param)
    calib = small_calib(root)
    qconfig = CASES[request.param][0]
    return (request.param, _quantize(tiny_llama, root / "ascendv1", qconfig, "ascendv1_saver", calib),
            _quantize(tiny_llama, root / "ct", qconfig, "compressed_tensors", calib))


def quant_linears(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_layout_config_and_bit_exact_round_trip(written):
    from compressed_tensors.quantization import quant_scheme

    case, ascend_dir, ct_dir = written
    _, preset_name, fmt = CASES[case]
    quantization = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == fmt and "lm_head" in quantization["ignore"]
    (group,) = quantization["config_groups"].values()
    preset = getattr(quant_scheme, preset_name)
    assert group["weights"] == preset["weights"].model_dump(mode="json")
    act = preset.get("input_activations")
    assert group["input_activations"] == (act and act.model_dump(mode="json"))
    assert check_compressed_tensors(ct_dir) == []  # no error, and no int8 kernel limit mistaken for MXFP8's

    tensors = load_file(next(ct_dir.glob("*.safetensors")))
    ours = quant_linears(load_ascendv1(ascend_dir))
    assert len(ours) == 14
    exponents = set()
    for name, module in ours.items():
        n, k = module.qweight.shape
        if fmt == "mxfp4-pack-quantized":
            packed = tensors[f"{name}.weight_packed"]
            assert (packed.dtype, list(packed.shape)) == (torch.uint8, [n, k // 2])
            assert f"{name}.weight" not in tensors
        else:
            weight = tensors[f"{name}.weight"]
            assert (weight.dtype, list(weight.shape)) == (torch.float8_e4m3fn, [n, k])
        scale = tensors[f"{name}.weight_scale"]
        assert (scale.dtype, list(scale.shape)) == (torch.uint8, [n, k // 32])
        assert not any(f"{name}.{s}" in tensors for s in ("weight_zero_point", "input_scale", "weight_global_scale"))
        exponents |= set(scale.unique().tolist())
        assert torch.equal(reference_dequantize(tensors, name), module.dequantized_weight().double()), name
    assert len(exponents) > 1


def test_transformers_loads_it_equals_our_reader_and_generates(written):
    """dequantize=True: the weights are exactly ours (through the decompressor's bfloat16, exact for MX values of
    these magnitudes), so the logits equal our reader's with its activation quantization switched off
    (transformers' dense route does not quantize activations; W4A16 has none to switch off)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    case, ascend_dir, ct_dir = written
    theirs = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, local_files_only=True,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ours = load_ascendv1(ascend_dir).eval()
    for name, module in quant_linears(ours).items():
        expected = module.dequantized_weight()
        assert torch.equal(expected.to(torch.bfloat16).float(), expected), name  # bf16 holds it: the check is fair
        assert torch.equal(theirs.get_submodule(name).weight, expected), name
        module.quantize_input = lambda x: x
    ids = torch.randint(0, theirs.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    out = theirs.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_activation_exponents_differ_from_the_librarys_rule():
    """What the checkpoint does not carry: the activation exponent rule at run time. Ours (and the OCP spec's) is
    floor(log2 amax) − emax; compressed-tensors' dynamic MX activations (generate_mx_scales) first round amax to
    a power of two, upward from 1.75 · 2^k. A block whose maximum is 1.8 gets 2^-2 from us and 2^-1 from the
    library (for E2M1); below 1.75 the two agree."""
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    from msmodelslim.quantizer.float_formats import FP4_E2M1_EMAX, FP8_E4M3_EMAX, shared_exponent

    amax = torch.tensor([1.0, 1.5, 1.7, 1.8, 3.9])
    for bits, emax in ((4, FP4_E2M1_EMAX), (8, FP8_E4M3_EMAX)):
        ours = shared_exponent(amax, emax)
        theirs = generate_mx_scales(amax, bits) - 127
        assert ours.tolist()[:3] == theirs.tolist()[:3]
        assert (theirs - ours).tolist()[3:] == [1, 1]


def test_w4a8_mxfp_is_refused_by_name_before_any_weight_is_read(tiny_llama, tmp_path):
    from msmodelslim.core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"W4A8_MXFP \(MXFP4 weights, MXFP8 activations\) has no "
                                               r"compressed-tensors scheme"):
        _quantize(tiny_llama, tmp_path / "out", {"act": MXFP8, "weight": MXFP4}, "compressed_tensors",
                  small_calib(tmp_path))
    assert not (tmp_path / "out").exists()


def test_convert_from_ascendv1_writes_the_same_bytes(written, tmp_path):
    from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors

    case, ascend_dir, ct_dir = written
    convert_ascendv1_to_compressed_tensors(ascend_dir, tmp_path / "converted")
    direct = load_file(next(ct_dir.glob("*.safetensors")))
    converted = load_file(next((tmp_path / "converted").glob("*.safetensors")))
    raw = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # compare float8 by its bytes
    assert direct.keys() == converted.keys()
    for name, tensor in direct.items():
        assert tensor.dtype == converted[name].dtype and torch.equal(raw(tensor), raw(converted[name])), name


# ---- MoE experts -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_outputs(tiny_qwen3_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("mx_moe")
    calib = small_calib(root)
    return {case: _quantize(tiny_qwen3_moe, root / case, CASES[case][0], "compressed_tensors", calib, "Qwen3-30B-A3B")
            for case in ("W4A16_MXFP4", "W8A8_MXFP8")}


def test_mxfp4_experts_load_in_transformers_to_our_weights(moe_outputs):
    """transformers stacks the per-expert tensors into gate_up_proj [E, 2I, H] / down_proj [E, H, I]: each slice
    is exactly the slow reference's dequantization of the stored expert."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = moe_outputs["W4A16_MXFP4"]
    assert [f for f in check_compressed_tensors(out) if f.level == "error"] == []
    tensors = load_file(next(out.glob("*.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for layer in range(model.config.num_hidden_layers):
        experts = model.model.layers[layer].mlp.experts
        for e in range(model.config.num_experts):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            gate_up = torch.cat([reference_dequantize(tensors, f"{p}.gate_proj"),
                                 reference_dequantize(tensors, f"{p}.up_proj")])
            assert torch.equal(experts.gate_up_proj[e].double(), gate_up), p
            assert torch.equal(experts.down_proj[e].double(), reference_dequantize(tensors, f"{p}.down_proj")), p


def test_mxfp8_experts_are_written_and_the_transformers_bug_is_named(moe_outputs):
    """MXFP8 experts are written in the library's layout (the round trip holds), and the checker warns that
    transformers cannot load them. If this load stops failing, transformers was fixed: drop the warning."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = moe_outputs["W8A8_MXFP8"]
    findings = check_compressed_tensors(out)
    assert [f for f in findings if f.level == "error"] == []
    assert any(f.level == "warning" and "integrations/compressed_tensors.py:115" in f.message for f in findings)
    tensors = load_file(next(out.glob("*.safetensors")))
    p = "model.layers.0.mlp.experts.0.down_proj"
    assert tensors[f"{p}.weight"].dtype == torch.float8_e4m3fn and tensors[f"{p}.weight_scale"].dtype == torch.uint8
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
