"""`spec.calibration.next_block_inputs`: each block calibrates on the float outputs of the block before it (the
default) or on its outputs once quantized (`quantized`, GPTQ's sequential order). Checked against the saved
checkpoint read back independently (tests/reference_reader.py)."""
import json

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, write_pipeline, saved_tensors, output_file_bytes
from msmodelslim.core import runner
from msmodelslim.core.config import CalibrationConfig
from msmodelslim.core.errors import ConfigError
from reference_reader import load_reference_model
from tiny_models import make_tiny_model

GPTQ_W4 = {"type": "linear_quant", "exclude": ["lm_head"],
           "qconfig": {"weight": {**SCHEMES["w4a16_g16"]["weight"], "method": "gptq"}}}
STATIC = {"type": "linear_quant", "exclude": ["lm_head"], "qconfig": SCHEMES["w8a8_static"]}
SMOOTH = {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]}
DYNAMIC = {"type": "linear_quant", "exclude": ["lm_head"], "qconfig": SCHEMES["w8a8_dynamic"]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("next_inputs") / "src", "llama", seed=11)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    texts = [f"Sample {i}: " + "token " * (3 * i) + f"the next block sees what this one outputs, {i * 13}."
             for i in range(5)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return str(path)


def quantize(source, tmp_path, name, process, calib, next_block_inputs=None):
    calibration = {"early_stop": False}
    if next_block_inputs is not None:
        calibration["next_block_inputs"] = next_block_inputs
    out = tmp_path / name
    run_quant(source, out, write_pipeline(tmp_path / f"{name}.yaml", process, calib, calibration=calibration))
    return out


@pytest.fixture
def block_inputs(monkeypatch):
    """Per forward of a block: (block name, [(args, kwargs) of each batch], [hidden-state output of each batch])."""
    seen = []
    real = runner._forward_all

    def spied(block_name, requests, *args, **kwargs):
        taken = [(tuple(a.clone() if torch.is_tensor(a) else a for a in r.args), dict(r.kwargs)) for r in requests]
        outputs = real(block_name, requests, *args, **kwargs)
        seen.append((block_name, taken, [runner.block_hidden_state(o).clone() for o in outputs]))
        return outputs

    monkeypatch.setattr(runner, "_forward_all", spied)
    return seen


def test_the_default_is_float_and_is_not_written_into_the_practice():
    assert CalibrationConfig().next_block_inputs == "float"
    assert "next_block_inputs" not in CalibrationConfig().model_dump()
    assert CalibrationConfig(next_block_inputs="quantized").model_dump()["next_block_inputs"] == "quantized"


def test_a_bad_value_is_refused_before_any_weight_is_read(source, calib, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    with pytest.raises(ConfigError) as refused:
        quantize(source, tmp_path, "bad", [GPTQ_W4], calib, next_block_inputs="quantised")
    message = str(refused.value)
    assert "spec.calibration.next_block_inputs" in message and "'quantized'" in message, message
    assert not (tmp_path / "bad").exists()


def test_float_written_out_is_byte_identical_to_the_default(source, calib, tmp_path):
    default = quantize(source, tmp_path, "default", [GPTQ_W4], calib)
    explicit = quantize(source, tmp_path, "float", [GPTQ_W4], calib, next_block_inputs="float")
    assert output_file_bytes(default) == output_file_bytes(explicit)
    practice = yaml.safe_load((explicit / "Llama-2-7B_best_practice.yaml").read_text())
    assert "next_block_inputs" not in practice["spec"]["calibration"]


def _layer_outputs(reference, index: int, taken) -> list[torch.Tensor]:
    layer = reference.model.layers[index]
    with torch.no_grad():
        return [runner.block_hidden_state(layer(*args, **kwargs)) for args, kwargs in taken]


@pytest.mark.parametrize("process", [[GPTQ_W4], [STATIC], [SMOOTH, DYNAMIC]],
                         ids=["gptq_w4a16", "w8a8_static", "smooth_w8a8_dynamic"])
def test_quantized_next_block_inputs_are_the_saved_blocks_outputs(source, calib, tmp_path, block_inputs, process):
    out = quantize(source, tmp_path, "quantized", process, calib, next_block_inputs="quantized")
    practice = yaml.safe_load((out / "Llama-2-7B_best_practice.yaml").read_text())
    assert practice["spec"]["calibration"]["next_block_inputs"] == "quantized"
    reference = load_reference_model(out).float().eval()
    layers = [name for name, _, _ in block_inputs]
    # each block: its calibration forward, then the forward of the quantized block; the last block has no next
    names = sorted(set(layers), key=layers.index)
    assert layers == [n for n in names[:-1] for _ in (0, 1)] + [names[-1]], layers
    first_inputs = {}
    for name, taken, _ in block_inputs:
        first_inputs.setdefault(name, taken)
    for index, (name, following) in enumerate(zip(names, names[1:])):
        float_outputs = block_inputs[2 * index][2]
        fed = [args[0] for args, _ in first_inputs[following]]
        expected = _layer_outputs(reference, index, first_inputs[name])
        for got, want, plain in zip(fed, expected, float_outputs):
            scale = want.abs().max()
            assert (got - want).abs().max() <= 1e-5 * scale, (name, float((got - want).abs().max() / scale))
            # what the default would have fed differs: the check can tell the two apart
            assert (plain - want).abs().max() > 1e-3 * scale, name


def test_quantized_inputs_change_the_later_blocks_only(source, calib, tmp_path):
    plain = quantize(source, tmp_path, "plain", [GPTQ_W4], calib)
    fed = quantize(source, tmp_path, "fed", [GPTQ_W4], calib, next_block_inputs="quantized")
    a, b = saved_tensors(plain), saved_tensors(fed)
    first = [k for k in a if k.startswith("model.layers.0.") and k.endswith(".weight_packed")]
    later = [k for k in a if k.startswith("model.layers.1.") and k.endswith(".weight_packed")]
    assert first and later
    assert all(torch.equal(a[k], b[k]) for k in first)  # block 0 calibrates on the embeddings either way
    assert any(not torch.equal(a[k], b[k]) for k in later)


def test_the_dry_run_times_the_extra_forward(source, calib, tmp_path, block_inputs):
    config = write_pipeline(tmp_path / "c.yaml", [GPTQ_W4], calib, calibration={"next_block_inputs": "quantized"})
    estimate = run_quant(source, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert not (tmp_path / "dry").exists()
    assert any("next_block_inputs quantized" in a for a in estimate.assumptions)
    timed = [name for name, _, _ in block_inputs]
    assert len(timed) == 2 and timed[0] == timed[1], timed  # the calibration forward, then the quantized block's
