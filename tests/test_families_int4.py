"""Compressed-tensors pack-quantized int4 checkpoints (Kimi-K2-Thinking ships its routed experts so): a tiny Kimi-K2
checkpoint whose experts are compressed with the compressed-tensors library loads with every expert weight equal to
the library's own fake-quantization of the float weight it came from (so within half a step of it), and quantizes
end to end: `check --model_path` accounts for every input tensor, the reader's model stays close to the float one."""
import json
import re
import shutil

import pytest
import torch
import yaml
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import SCHEMES
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.packed_checkpoint import PackQuantizedCheckpoint
from msmodelslim.model.registry import create_adapter
from tiny_models import make_tiny_model

GROUP = 32
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
EXPERT_WEIGHT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
MODEL_TYPE = "Kimi-K2-Thinking"


def compress_experts(source, dest) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A copy of `source` with every routed expert weight pack-quantized int4 (group 32, symmetric) by
    compressed-tensors, and config.json's quantization_config as Kimi-K2-Thinking's; returns, per weight name,
    (float weight, the library's fake-quantized weight, per-group scale)."""
    shutil.copytree(source, dest)
    (weights,) = dest.glob("*.safetensors")
    state = load_file(weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=ARGS)
    meant = {}
    for name in [n for n in state if EXPERT_WEIGHT.search(n)]:
        w = state.pop(name)
        groups = w.reshape(w.shape[0], -1, GROUP)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS)
        packed = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
        prefix = name[: -len(".weight")]
        state.update({f"{prefix}.{k}": v for k, v in packed.items()})
        meant[name] = (w, fake_quantize(w, scale, zero_point, ARGS), scale)
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": ARGS.model_dump()}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return meant


@pytest.fixture(scope="module")
def kimi_int4(tmp_path_factory):
    float_source = make_tiny_model(tmp_path_factory.mktemp("kimi_float"), "kimi_k2")
    dest = tmp_path_factory.mktemp("kimi") / "int4"
    return float_source, dest, compress_experts(float_source, dest)


def test_pack_quantized_experts_load_as_the_library_dequantizes_them(kimi_int4):
    _, source, meant = kimi_int4
    with safe_open(next(source.glob("*.safetensors")), "pt") as f:
        stored = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight_packed").get_dtype() == "I32"
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" not in stored
    adapter = create_adapter(MODEL_TYPE, str(source), False)
    assert isinstance(adapter.checkpoint, PackQuantizedCheckpoint)
    names = set(adapter.checkpoint.names())
    assert set(meant) <= names and not any(n.endswith(("weight_packed", "weight_shape", "weight_scale")) for n in names)
    assert adapter.unused_checkpoint_tensors(adapter.init_skeleton()) == []
    state = adapter.init_model(torch.device("cpu"), load_layers=True).state_dict()
    assert len(meant) == 2 * 4 * 3
    for name, (w, fake, scale) in meant.items():
        assert torch.equal(state[name], fake), f"{name}: not the library's dequantization"
        half_step = scale.repeat_interleave(GROUP, dim=1) / 2
        assert bool(((state[name] - w).abs() <= half_step * (1 + 1e-5)).all()), f"{name}: beyond half a step"
        assert not torch.equal(state[name], w)  # int4 changed it: the test can tell the two apart


def test_int4_checkpoint_quantizes_end_to_end(kimi_int4, tmp_path, capsys):
    float_source, source, _ = kimi_int4
    config = tmp_path / "c.yaml"
    rule = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*"], "exclude": ["lm_head"]}
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"runner": "layer_wise", "process": [rule]}}))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--config_path", str(config)]) == 0, capsys.readouterr().err
    code = main(["check", str(out), "--model_path", str(source)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.layers.2.mlp.experts.3.down_proj.weight"] == "W8A8_DYNAMIC"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(next(out.glob("quant_model_weights*.safetensors")), "pt") as f:
        assert not any("weight_packed" in k for k in f.keys())

    # close to the float model the int4 checkpoint stands for (its dequantized weights)
    dequantized = create_adapter(MODEL_TYPE, str(source), False).init_model(torch.device("cpu"), load_layers=True)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, ours = dequantized(input_ids=ids).logits, load_ascendv1(out)(input_ids=ids).logits
    drift = ((ours - reference).norm() / reference.norm()).item()
    assert drift < 0.15, f"drifted {drift:.3f}"


def test_experts_kept_float_are_accounted_for(kimi_int4, tmp_path, capsys):
    """The int4 experts written back as float: their packed parts became that float weight, nothing is missing."""
    _, source, meant = kimi_int4
    config = tmp_path / "c.yaml"
    rule = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*self_attn*"]}
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"runner": "layer_wise", "process": [rule]}}))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--config_path", str(config)]) == 0, capsys.readouterr().err
    assert main(["check", str(out), "--model_path", str(source)]) == 0, capsys.readouterr().out
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    with safe_open(next(out.glob("quant_model_weights*.safetensors")), "pt") as f:
        written = f.get_tensor(name)
    assert torch.equal(written.float(), meant[name][1])


@pytest.mark.parametrize("change,needle", [
    ({"format": "float-quantized"}, r"compressed-tensors format \['float-quantized'\] is not supported"),
    ({"config_groups": {"a": {"targets": ["Linear"], "weights": ARGS.model_dump()},
                        "b": {"targets": ["Embedding"], "weights": {**ARGS.model_dump(), "num_bits": 8}}}},
     "2 different weight quantizations"),
])
def test_unsupported_compressed_tensors_configs_are_refused_before_any_read(kimi_int4, tmp_path, monkeypatch,
                                                                             change, needle):
    _, source, _ = kimi_int4
    copy = tmp_path / "m"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(change)
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match=needle):
        create_adapter(MODEL_TYPE, str(copy), False)
