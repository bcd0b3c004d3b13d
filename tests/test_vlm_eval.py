"""`msmodelslim eval` on a vision-language model (app/evaluate_vlm.py): a tiny Qwen2.5-VL quantized W8A8 through the
CLI is scored against its float model on held-out image+prompt pairs (the built-in evalImages by default). The float
row is exactly zero (gap and KL), an all-float ascendv1 checkpoint of the same model agrees to rounding (the
teacher-forced inputs and the reader match transformers' model), the quantized row is positive and finite, and bad
arguments fail before any weight is read."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from msmodelslim.app.evaluate_vlm import evaluate_vlm, is_vlm_checkpoint
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import ConfigError, InvalidDatasetError, InvalidModelError
from tiny_vlm import make_images, make_tiny_vlm

CPU = torch.device("cpu")
MODEL_TYPE = "Qwen2.5-VL-7B-Instruct"
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
W8A8 = {"act": {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}, "weight": W8}


def quantize_cli(model: Path, out: Path, images: Path, tmp_path: Path, include: list[str]) -> Path:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "qconfig": W8A8, "include": include,
                     "exclude": ["lm_head", "*merger*"]}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}], "dataset": str(images)}}))
    assert main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--config_path", str(config)]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_eval")
    model = make_tiny_vlm(root / "model", "qwen2_5_vl")
    images = make_images(root / "calib")[0].parent
    return {"model": model,
            "w8a8": quantize_cli(model, root / "w8a8", images, root, ["*"]),
            # a rule that matches no layer (warned): every tensor written in float
            "float": quantize_cli(model, root / "float", images, root, ["no_such_layer"])}


def test_vlm_checkpoints_are_routed_to_the_vlm_eval(runs, tmp_path):
    assert is_vlm_checkpoint(runs["model"]) and is_vlm_checkpoint(runs["w8a8"])
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_vlm_checkpoint(text) and not is_vlm_checkpoint(tmp_path / "missing")


def test_float_row_is_exactly_zero_and_the_quantized_row_positive(runs):
    report = evaluate_vlm(runs["model"], runs["w8a8"], None, CPU, max_samples=3, max_new_tokens=6)
    print(report.table())
    f, q = report.float, report.quantized
    assert report.samples == 3 and report.dataset.endswith("evalImages")  # the built-in held-out set by default
    assert f.answer_tokens == 3 * 6 and f.positions > f.answer_tokens  # the prompt (image tokens) counts for KL
    assert f.kl == 0.0 and f.answer_ce - f.answer_ce == 0.0 and f.top1 == 1.0
    assert math.isfinite(q.answer_ce) and math.isfinite(q.kl)
    assert q.kl > 0 and q.answer_ce - f.answer_ce > 0  # measured: KL 4.0e-4, gap +0.009 nats/token
    assert f.answer_ce > 0


def test_an_all_float_checkpoint_agrees_to_rounding(runs):
    """Nothing quantized: our reader's model, fed the stored teacher-forced inputs (images included), computes
    what transformers' float model computed, so the row is 0 to rounding. (The float row's top-1 of 100 % checks
    the teacher-forced inputs: they must reproduce generate()'s greedy choices.)"""
    report = evaluate_vlm(runs["model"], runs["float"], None, CPU, max_samples=2, max_new_tokens=4)
    print(report.table())
    q = report.quantized
    assert q.kl < 1e-9 and abs(q.answer_ce - report.float.answer_ce) < 1e-6 and q.top1 == 1.0


def test_cli_prints_the_before_after_table(runs, capsys):
    assert main(["eval", "--model_path", str(runs["model"]), "--quant_path", str(runs["w8a8"]),
                 "--max_samples", "2", "--max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "held-out image+prompt pairs: 2" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("float ", "quantized "))}
    assert float(rows["float"][2]) == 0.0 and float(rows["float"][3]) == 0.0  # CE gap, KL
    assert float(rows["quantized"][3]) > 0


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails a test that reads a weight or builds a model."""
    import transformers

    def refuse(*_args, **_kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", refuse)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    monkeypatch.setattr("msmodelslim.format.ascendv1.reader.load_ascendv1", refuse)


def test_bad_arguments_fail_before_any_weight_is_read(runs, tmp_path, no_weights_read):
    model, quant = runs["model"], runs["w8a8"]
    with pytest.raises(InvalidDatasetError, match="not found"):
        evaluate_vlm(model, quant, str(tmp_path / "no_such_images"), CPU)
    with pytest.raises(InvalidDatasetError, match="not found"):  # the calibration set is not an evaluation set
        evaluate_vlm(model, quant, "calibImages", CPU)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(InvalidDatasetError, match="a.png"):
        evaluate_vlm(model, quant, str(broken), CPU)
    with pytest.raises(InvalidModelError):
        evaluate_vlm(model, tmp_path / "no_such_checkpoint", None, CPU)
    with pytest.raises(ConfigError, match="--max_new_tokens"):
        evaluate_vlm(model, quant, None, CPU, max_new_tokens=0)
    # through the CLI: the exit code of the error, its message, no traceback
    assert main(["eval", "--model_path", str(model), "--quant_path", str(quant), "--dataset",
                 str(tmp_path / "no_such_images")]) == InvalidDatasetError.exit_code
    assert main(["eval", "--model_path", str(model), "--quant_path", str(quant), "--max_samples", "0"]) \
        == ConfigError.exit_code


def test_a_checkpoint_of_another_model_is_refused_early(runs, tmp_path, no_weights_read):
    other = tmp_path / "other"
    other.mkdir()
    for file in runs["w8a8"].iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["vocab_size"] = 999
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not quantized from"):
        evaluate_vlm(runs["model"], other, None, CPU)


def test_a_text_model_still_needs_a_dataset(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["eval", "--model_path", str(text), "--quant_path", str(text)]) == ConfigError.exit_code


def test_eval_images_are_held_out_from_the_calibration_images():
    from msmodelslim.core.dataset import LAB_CALIB, LAB_EVAL
    from msmodelslim.core.vlm_dataset import load_vlm_samples

    evaluation = load_vlm_samples(str(LAB_EVAL / "evalImages"), "unused")
    calibration = load_vlm_samples(str(LAB_CALIB / "calibImages"), "unused")
    assert len(evaluation) >= 10
    assert not {s.text for s in evaluation} & {s.text for s in calibration}
    calibration_bytes = {s.image.read_bytes() for s in calibration}
    assert not any(s.image.read_bytes() in calibration_bytes for s in evaluation)
