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
# both formats store exactly the same numbers for it (static W8A8's bias is folded into ascendv1's int32 quant_bias)
W8A8_DYNAMIC = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}, "weight": W8}


def quantize_cli(model: Path, out: Path, images: Path, tmp_path: Path, include: list[str],
                 savers: tuple[str, ...] = ("ascendv1_saver",), qconfig: dict = W8A8) -> Path:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "qconfig": qconfig, "include": include,
                     "exclude": ["lm_head", "*merger*"]}],
        "save": [{"type": saver, "part_file_size": 4} for saver in savers], "dataset": str(images)}}))
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
            "float": quantize_cli(model, root / "float", images, root, ["no_such_layer"]),
            "both": quantize_cli(model, root / "both", images, root, ["*"], ("ascendv1_saver", "compressed_tensors"),
                                 W8A8_DYNAMIC)}


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


def test_a_compressed_tensors_output_scores_as_its_ascendv1_twin(runs, tmp_path):
    """One run saving both formats. Qwen2.5-VL keeps its published tensor names while compressed-tensors targets name
    the modules transformers renames on load (model.language_model.*, model.visual.*): our reader maps one to the
    other, so eval of either folder builds the same layers and gives the same rows."""
    from safetensors.torch import load_file, save_file

    rows = {}
    for folder in ("ascendv1", "compressed_tensors"):
        report = evaluate_vlm(runs["model"], runs["both"] / folder, None, CPU, max_samples=2, max_new_tokens=4)
        rows[folder] = (report.quantized.answer_ce, report.quantized.kl, report.quantized.top1)
    print(rows)
    assert rows["compressed_tensors"] == rows["ascendv1"] and rows["ascendv1"][1] > 0
    targets = [t for group in json.loads((runs["both"] / "compressed_tensors" / "config.json").read_text())[
        "quantization_config"]["config_groups"].values() for t in group["targets"]]
    assert "model.language_model.layers.0.self_attn.q_proj" in targets
    # a target's tensor missing on disk (under its published name) is named before any weight is read
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in (runs["both"] / "compressed_tensors").iterdir():
        tensors = load_file(file) if file.suffix == ".safetensors" else None
        if tensors is not None and tensors.pop("model.layers.0.self_attn.q_proj.weight_scale", None) is not None:
            save_file(tensors, damaged / file.name, metadata={"format": "pt"})
        else:
            (damaged / file.name).write_bytes(file.read_bytes())
    # convert of the ascendv1 folder writes the same targets (transformers' names) over the published tensor names
    converted = tmp_path / "converted"
    assert main(["convert", "--model_path", str(runs["both"] / "ascendv1"), "--save_path", str(converted)]) == 0
    config = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert sorted(t for group in config["config_groups"].values() for t in group["targets"]) == sorted(targets)
    report = evaluate_vlm(runs["model"], converted, None, CPU, max_samples=2, max_new_tokens=4)
    assert (report.quantized.answer_ce, report.quantized.kl, report.quantized.top1) == rows["ascendv1"]
    with pytest.raises(InvalidModelError, match=r"model\.language_model\.layers\.0\.self_attn\.q_proj \(stored as "
                                                r"model\.layers\.0\.self_attn\.q_proj\).*weight_scale"):
        evaluate_vlm(runs["model"], damaged, None, CPU)


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
    monkeypatch.setattr("msmodelslim.format.readers.load_quantized_checkpoint", refuse)


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
