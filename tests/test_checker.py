"""The ascendv1 checklist catches what breaks the serving engine's loader."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import SCHEMES, run_quant, small_calib, write_config
from msmodelslim.format.ascendv1.checker import check_ascendv1


@pytest.fixture
def static_out(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path)))
    return out


def errors(path, **kwargs):
    return [f.message for f in check_ascendv1(path, **kwargs) if f.level == "error"]


def rewrite_shard(path, change):
    (shard,) = path.glob("quant_model_weights-*.safetensors")
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)


def test_clean_output_passes(static_out):
    assert errors(static_out, expected_linears=["model.layers.0.self_attn.q_proj"],
                  fused_groups=(("q_proj", "k_proj", "v_proj"),)) == []


def test_left_over_quantization_config(static_out):
    config = json.loads((static_out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (static_out / "config.json").write_text(json.dumps(config))
    assert any("quantization_config" in e for e in errors(static_out))


def test_missing_description_entry_and_missing_linear(static_out):
    desc = json.loads((static_out / "quant_model_description.json").read_text())
    del desc["model.layers.0.mlp.up_proj.weight"]
    (static_out / "quant_model_description.json").write_text(json.dumps(desc))
    found = errors(static_out, expected_linears=["model.layers.0.mlp.up_proj"])
    assert any("has no entry in the description" in e for e in found)
    assert any("model.layers.0.mlp.up_proj.weight has no description entry" in e for e in found)


def test_wrong_dtype_and_shape(static_out):
    def change(t):
        t["model.layers.0.self_attn.q_proj.quant_bias"] = t["model.layers.0.self_attn.q_proj.quant_bias"].to(torch.int64)
        t["model.layers.0.self_attn.k_proj.input_scale"] = t["model.layers.0.self_attn.k_proj.input_scale"].reshape(())

    rewrite_shard(static_out, change)
    found = errors(static_out)
    assert any("q_proj: 'quant_bias' is torch.int64" in e for e in found)
    assert any("k_proj: 'input_scale' has shape []" in e for e in found)


def test_fused_layers_must_share_type_and_input_scale(static_out):
    desc = json.loads((static_out / "quant_model_description.json").read_text())
    rewrite_shard(static_out, lambda t: t["model.layers.1.self_attn.v_proj.input_scale"].mul_(2))
    desc_path = static_out / "quant_model_description.json"
    desc["model.layers.0.mlp.gate_proj.weight"] = "W8A8_DYNAMIC"
    desc_path.write_text(json.dumps(desc))
    found = errors(static_out, fused_groups=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")))
    assert any("different input_scale" in e and "layers.1.self_attn" in e for e in found)
    assert any("different types" in e and "layers.0.mlp" in e for e in found)


def test_asymmetric_dynamic_weights_are_an_error(tiny_llama, tmp_path):
    out = tmp_path / "dyn"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"]))
    rewrite_shard(out, lambda t: t["model.layers.0.mlp.down_proj.weight_offset"].add_(1))
    assert any("must be symmetric" in e for e in errors(out))


def test_check_command(static_out, capsys):
    from msmodelslim.cli.__main__ import main

    assert main(["check", str(static_out)]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    rewrite_shard(static_out, lambda t: t.pop("model.layers.0.mlp.up_proj.deq_scale"))
    assert main(["check", str(static_out)]) == 4
    assert "needs tensor 'deq_scale'" in capsys.readouterr().out
    assert main(["check", str(static_out.parent)]) == 2
