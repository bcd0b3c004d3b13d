"""PDMIX: act scope pd_mix -> ascendv1 W8A8_MIX (formats.md A.4.2): the W8A8 static tensors plus the dynamic
kernel's weight_scale/weight_offset; decode nodes run the static kernel, the others the dynamic one."""
import json

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, small_calib, saved_tensors
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.scheme import LinearQConfig, Scheme
from reference_reader import load_reference_model

W8 = SCHEMES["w8a8_static"]["weight"]
PD_MIX = {"dtype": "int8", "scope": "pd_mix", "symmetric": False, "method": "minmax"}


def _config(path, act, save="ascendv1_saver"):
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "dataset": small_calib(path.parent), "save": [{"type": save}],
        "process": [{"type": "linear_quant", "qconfig": {"act": act, "weight": W8}, "exclude": ["lm_head"]}]}}))
    return path


def test_pd_mix_resolves_to_w8a8_mix_and_calibrates():
    q = LinearQConfig.model_validate({"act": PD_MIX, "weight": W8})
    assert q.scheme == Scheme.W8A8_MIX and q.static_act and q.needs_calibration


def slow_static(x, s_in, o_in, w):
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        xq = [min(127, max(-128, round(float(v) / s_in + o_in))) for v in x[t]]
        for n in range(w.shape[0]):
            out[t, n] = sum(s_in * (a - o_in) * float(b) for a, b in zip(xq, w[n]))
    return out


def slow_dynamic(x, w):
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = max(abs(float(v)) for v in x[t]) / 127
        xq = [min(127, max(-128, round(float(v) / s))) for v in x[t]]
        for n in range(w.shape[0]):
            out[t, n] = sum(s * a * float(b) for a, b in zip(xq, w[n]))
    return out


def test_both_kernels_of_a_w8a8_mix_layer_against_slow_references():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (5, 12), generator=g, dtype=torch.int8)
    scale = torch.rand(5, 1, generator=g) * 0.01 + 0.001
    layer = QuantLinear(Scheme.W8A8_MIX, q, scale, torch.zeros_like(scale), None, torch.tensor(0.02), torch.tensor(3.0))
    x = torch.randn(4, 12, generator=g)
    w = (q.float() * scale).double()
    torch.testing.assert_close(layer(x).double(), slow_dynamic(x, w), rtol=1e-5, atol=1e-6)
    layer.decode_path = True
    torch.testing.assert_close(layer(x).double(), slow_static(x, 0.02, 3.0, w), rtol=1e-5, atol=1e-6)


def test_w8a8_mix_round_trip_matches_static_w8a8_plus_the_dynamic_scale(tiny_llama, tmp_path):
    mix, static = tmp_path / "mix", tmp_path / "static"
    run_quant(tiny_llama, mix, _config(tmp_path / "mix.yaml", PD_MIX))
    run_quant(tiny_llama, static, _config(tmp_path / "static.yaml", {**PD_MIX, "scope": "per_tensor"}))
    description = json.loads((mix / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8_MIX"
    layer = "model.layers.1.mlp.down_proj"
    assert description[f"{layer}.weight"] == description[f"{layer}.weight_scale"] == "W8A8_MIX"
    a, b = saved_tensors(mix), saved_tensors(static)
    for suffix in ("weight", "quant_bias", "input_scale", "input_offset", "deq_scale"):  # the decode half is W8A8
        assert torch.equal(a[f"{layer}.{suffix}"], b[f"{layer}.{suffix}"]), suffix
    deq, s_in = a[f"{layer}.deq_scale"], a[f"{layer}.input_scale"]
    deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
    torch.testing.assert_close(a[f"{layer}.weight_scale"][:, 0], deq / s_in, rtol=1e-6, atol=0)
    assert a[f"{layer}.weight_scale"].dtype == torch.float32 and not a[f"{layer}.weight_offset"].any()
    assert [f for f in check_ascendv1(mix) if f.level == "error"] == []
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():  # our reader (prefill path) and the independent reference reader agree
        ours = load_ascendv1(mix)(input_ids=ids).logits
        reference = load_reference_model(mix)(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_w8a8_mix_is_refused_for_compressed_tensors_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match="pd_mix .* no compressed-tensors equivalent"):
        run_quant(tiny_llama, tmp_path / "ct", _config(tmp_path / "ct.yaml", PD_MIX, save="compressed_tensors"))


def test_convert_refuses_w8a8_mix(tiny_llama, tmp_path):
    from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors

    run_quant(tiny_llama, tmp_path / "mix", _config(tmp_path / "mix.yaml", PD_MIX))
    with pytest.raises(UnsupportedError, match="W8A8_MIX"):
        convert_ascendv1_to_compressed_tensors(tmp_path / "mix", tmp_path / "ct")
