"""The Python API: the command line's use cases as functions, with the same checks and errors."""
import pytest

import msmodelslim
from helpers import SCHEMES
from msmodelslim.core.errors import ConfigError, InvalidModelError


def test_quantize_with_a_dict_pipeline_then_evaluate(tiny_llama, tmp_path):
    pipeline = {"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}]}}
    out = tmp_path / "out"
    report = msmodelslim.quantize(tiny_llama, out, model_type="Llama-2-7B", config=pipeline)
    assert report.description["model_quant_type"] == "W8A8_DYNAMIC" and (out / "quant_model_description.json").exists()
    assert report.plan["model.layers.0.mlp.down_proj"] == "W8A8_DYNAMIC" and report.plan["lm_head"] == "FLOAT"
    text = tmp_path / "eval.txt"
    text.write_text("Debian packages are installed with apt and configured in /etc. " * 60)
    scores = msmodelslim.evaluate(tiny_llama, out, str(text), window=32, max_windows=3)
    assert scores["float"].windows == scores["quantized"].windows == 3
    assert 0.5 < scores["quantized"].perplexity / scores["float"].perplexity < 2


def test_quantize_with_a_quant_type_and_a_dry_run(tiny_llama, tmp_path):
    report = msmodelslim.quantize(tiny_llama, tmp_path / "out", model_type="Llama-2-7B", quant_type="w8a16",
                                  allow_default_practice=True, dry_run=True)
    assert set(report.plan.values()) == {"W8A16", "FLOAT"} and not (tmp_path / "out").exists()


def test_api_errors_are_the_command_lines(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        msmodelslim.quantize(tiny_llama, tmp_path / "out", model_type="Llama-2-7B")
    with pytest.raises(ConfigError, match="spec.process"):
        msmodelslim.quantize(tiny_llama, tmp_path / "out", model_type="Llama-2-7B",
                             config={"apiversion": "modelslim_v1", "spec": {"process": [{"type": "nope"}]}})
    with pytest.raises(InvalidModelError, match="never downloaded"):
        msmodelslim.evaluate("Qwen/Qwen2.5-7B", tmp_path, "prose_eval.txt")
