"""dualscale (W4A4_MXFP4_DUALSCALE): the two-level quantizer against a slow scalar reference, and the scheme end to
end: config -> quantizer -> ascendv1 (weight_dual_scale [N, K/D, 1] float32, bias tagged with the type) -> our
reader and the independent reference reader -> checker; and the refusals, before any weight is read."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import run_quant, write_config
from msmodelslim.core.errors import ConfigError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.dualscale import fake_quantize_act_dualscale, quantize_weight_dualscale
from msmodelslim.quantizer.float_formats import decode_fp4_e2m1
from reference_reader import load_reference_model

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_e2m1(x: float) -> float:
    magnitude = min(abs(x), 6.0)
    index = min(range(len(GRID)), key=lambda i: (abs(GRID[i] - magnitude), i % 2))
    return math.copysign(GRID[index], x) if GRID[index] else 0.0


def reference_row(row: list[float], dual_block: int) -> tuple[list[float], list[float], list[float]]:
    """(element values, E8M0 scales, dual scales) of one row: S = max/6 per dual block (float32 arithmetic, as the
    kernel's), then per 32 of row/S the OCP exponent floor(log2 amax) - 2 and nearest-even E2M1 elements."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))
    block = min(dual_block, len(row))
    elements, scales, duals = [], [], []
    for start in range(0, len(row), block):
        amax = max(abs(v) for v in row[start:start + block])
        s = f32(amax / 6.0) if amax > 0 else 1.0
        duals.append(s)
        scaled = [f32(v / s) for v in row[start:start + block]]
        for b in range(0, block, 32):
            part = scaled[b:b + 32]
            top = max(abs(v) for v in part)
            e = math.floor(math.log2(top)) - 2 if top > 0 else -127
            scales.append(2.0 ** e)
            elements += [round_e2m1(v / 2.0 ** e) for v in part]
    return elements, scales, duals


@pytest.mark.parametrize("k,dual_block", [(1536, 512), (64, 512), (256, 64)])
def test_weight_quantizer_matches_the_scalar_reference(k, dual_block):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(6, k, generator=g) * torch.logspace(-2, 1, k).flip(0)  # channels of very different ranges
    w[1, : min(k, dual_block)] = 0  # an all-zero dual block
    codes, scale, dual = quantize_weight_dualscale(w, dual_block)
    assert codes.dtype == torch.uint8 and dual.shape == (6, max(1, k // dual_block))
    values = decode_fp4_e2m1(codes)
    for n in range(w.shape[0]):
        elements, scales, duals = reference_row(w[n].tolist(), dual_block)
        assert dual[n].tolist() == duals, n
        assert scale[n].tolist() == scales, n
        assert values[n].tolist() == elements, n


def test_activation_quantizer_matches_the_scalar_reference():
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2)) * 3
    x[0, 0, 100] = 500.0  # an outlier channel in the second block
    got = fake_quantize_act_dualscale(x, 128).reshape(-1, 256)
    for t, row in enumerate(x.reshape(-1, 256).tolist()):
        elements, scales, duals = reference_row(row, 128)
        expected = [v * scales[i // 32] * duals[i // 128] for i, v in enumerate(elements)]
        assert got[t].tolist() == pytest.approx(expected, rel=1e-6, abs=0), t


def test_dual_scale_lowers_the_error_of_inputs_with_outlier_blocks():
    """What the scheme is for: a block with tiny values next to a block with large ones keeps its resolution
    (MXFP4 alone already does per 32; the dual scale adds range the E8M0 scale would have to spend)."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 1e-3
    error = ((fake_quantize_act_dualscale(x, 512) - x) ** 2).sum()
    assert torch.isfinite(error) and error < (x ** 2).sum() * 0.05


DUAL = {"dtype": "mxfp4", "scope": "dual_scale", "symmetric": True, "method": "dualscale", "ext": {"dual_block_size": 64}}
QCONFIG = {"act": DUAL, "weight": DUAL}


def test_round_trip_through_both_readers(tiny_qwen2, tmp_path):
    """q/k/v/o/gate/up (input 64) are one dual block each, down_proj (input 128) two; q/k/v carry a bias."""
    out = tmp_path / "out"
    run_quant(tiny_qwen2, out, write_config(tmp_path / "c.yaml", QCONFIG), "Qwen2.5-7B-Instruct")
    errors = [f.message for f in check_ascendv1(out) if f.level == "error"]
    assert errors == []
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W4A4_MXFP4_DUALSCALE" and description["group_size"] == 32
    p = "model.layers.0.self_attn.q_proj"
    assert description[f"{p}.bias"] == description[f"{p}.weight_dual_scale"] == "W4A4_MXFP4_DUALSCALE"
    (shard,) = out.glob("*.safetensors")
    with safe_open(shard, "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight_dual_scale")
        assert down.dtype == torch.float32 and list(down.shape) == [64, 2, 1]
        assert list(f.get_tensor(f"{p}.weight_dual_scale").shape)[1:] == [1, 1]
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    ours, reference = load_ascendv1(out), load_reference_model(out)
    count = 0
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            codes, scale, dual = quantize_weight_dualscale(original.get_submodule(name).weight, 64)
            assert module.scheme.value == "W4A4_MXFP4_DUALSCALE", name
            assert torch.equal(module.qweight, codes) and torch.equal(module.weight_scale, scale), name
            assert torch.equal(module.weight_dual_scale, dual), name
            count += 1
    assert count == 14
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs, float_logits = (m(input_ids=ids).logits for m in (ours, reference, original))
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mine, float_logits, atol=1e-3)  # the activations are quantized too


def test_checker_flags_a_broken_dual_scale(tiny_qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    run_quant(tiny_qwen2, out, write_config(tmp_path / "c.yaml", QCONFIG), "Qwen2.5-7B-Instruct")
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.down_proj.weight_dual_scale"] = tensors["model.layers.0.mlp.down_proj.weight_dual_scale"][:, :, 0].clone()
    tensors["model.layers.0.mlp.up_proj.weight_dual_scale"][0, 0, 0] = -1.0
    save_file(tensors, shard)
    errors = [f.message for f in check_ascendv1(out) if f.level == "error"]
    assert any("down_proj" in e and "[N, K/D, 1]" in e for e in errors)
    assert any("up_proj" in e and "positive" in e for e in errors)


@pytest.mark.parametrize("qconfig,needle", [
    ({"act": {**DUAL, "scope": "per_block", "method": "minmax", "ext": {}}, "weight": DUAL}, "both {dtype: mxfp4, scope: dual_scale"),
    ({"weight": DUAL}, "both {dtype: mxfp4, scope: dual_scale"),
    ({"act": DUAL, "weight": {**DUAL, "ext": {}}}, "needs ext.dual_block_size"),
    ({"act": DUAL, "weight": {**DUAL, "ext": {"dual_block_size": 48}}}, "positive multiple of 32"),
    ({"act": {**DUAL, "ext": {"dual_block_size": 32}}, "weight": DUAL}, "dual_block_size differ"),
    ({"act": DUAL, "weight": {**DUAL, "method": "minmax"}}, "go together"),
    ({"act": DUAL, "weight": {**DUAL, "dtype": "mxfp8"}}, "go together"),
    ({"act": {**DUAL, "ext": {"dual_block_size": 96}}, "weight": {**DUAL, "ext": {"dual_block_size": 96}}},
     "neither divides nor exceeds the input size 128"),
])
def test_refusals_before_any_weight_is_read(tiny_qwen2, tmp_path, qconfig, needle):
    with pytest.raises(ConfigError, match=needle.replace("{", r"\{").replace("[", r"\[")):
        run_quant(tiny_qwen2, tmp_path / "out", write_config(tmp_path / "c.yaml", qconfig), "Qwen2.5-7B-Instruct")
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_refuses_dual_scale_before_reading(tiny_qwen2, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": QCONFIG, "exclude": ["lm_head"]}]}}))
    with pytest.raises(Exception, match="W4A4_MXFP4_DUALSCALE .* no compressed-tensors format"):
        run_quant(tiny_qwen2, tmp_path / "out", config, "Qwen2.5-7B-Instruct")
    assert not (tmp_path / "out").exists()
