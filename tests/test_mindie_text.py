"""`mindie_format_saver` for text and vision-language models (format/mindie.py): the MindIE layout holds the same
entries and tensors as ascendv1's (deq_scale always float32), under files named after the model's type; read back
by our reader and by tests/reference_reader.py it computes what the ascendv1 output of the same run computes;
`msmodelslim check` judges it; a killed run resumes to the same bytes; what the layout cannot hold is refused before
any weight is read, naming it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, saved_tensors, small_calib
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.tensors import decode_deq_scale
from msmodelslim.format.readers import load_quantized_checkpoint
from reference_reader import load_reference_model
from test_two_savers import assert_killed_run_resumes_to_identical_bytes, code, write_config  # noqa: F401
from tiny_models import make_tiny_model

MINDIE = {"type": "mindie_format_saver", "part_file_size": 4}
BOTH = [{"type": "ascendv1_saver", "part_file_size": 4}, MINDIE]
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
DUAL = {"dtype": "mxfp4", "scope": "dual_scale", "symmetric": True, "method": "dualscale",
        "ext": {"dual_block_size": 64}}
WRITTEN = {  # qconfig, the type the description records
    "w8a8_dynamic": (SCHEMES["w8a8_dynamic"], "W8A8_DYNAMIC"),
    "w8a8_static": (SCHEMES["w8a8_static"], "W8A8"),
    "w8a8_mxfp8": ({"act": MXFP8, "weight": MXFP8}, "W8A8_MXFP8"),
    "w4a4_mxfp4": ({"act": MXFP4, "weight": MXFP4}, "W4A4_MXFP4"),
    "w4a4_mxfp4_dualscale": ({"act": DUAL, "weight": DUAL}, "W4A4_MXFP4_DUALSCALE"),
}


def linear_quant(qconfig: dict) -> list[dict]:
    return [{"type": "linear_quant", "qconfig": qconfig, "exclude": ["lm_head"]}]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("scheme", list(WRITTEN))
def test_mindie_holds_the_ascendv1_tensors_under_its_names_and_reads_back_alike(tiny_llama, tmp_path, scheme):
    from msmodelslim.app.check import check_checkpoint

    qconfig, tag = WRITTEN[scheme]
    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant(qconfig), BOTH))
    mindie, ascendv1 = out / "mindie", out / "ascendv1"
    assert (mindie / f"quant_model_description_{tag.lower()}.json").is_file()
    assert {p.name for p in mindie.glob("*.safetensors")} == {f"quant_model_weight_{tag.lower()}-00001-of-00001"
                                                              ".safetensors"}
    description = json.loads((mindie / f"quant_model_description_{tag.lower()}.json").read_text())
    reference = json.loads((ascendv1 / "quant_model_description.json").read_text())
    assert description.pop("model_quant_type") == tag
    assert "version" not in description and "group_size" not in description  # protocol.md 4.8
    assert description == {k: v for k, v in reference.items() if k not in ("version", "model_quant_type", "metadata",
                                                                           "group_size", "optional")}
    ours, theirs = saved_tensors(mindie), saved_tensors(ascendv1)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        if name.endswith(".deq_scale"):  # always float32 in MindIE; ascendv1's follows the model's dtype
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, decode_deq_scale(theirs[name]))
        else:
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    _, findings = check_checkpoint(out, tiny_llama)
    assert [f.message for f in findings if f.level == "error"] == []
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(load_quantized_checkpoint(ascendv1), ids)
    assert torch.equal(logits(load_quantized_checkpoint(mindie), ids), want)
    independent = logits(load_reference_model(mindie), ids)
    assert ((independent - want).norm() / want.norm()).item() < 2e-3


def test_convert_reads_a_mindie_folder_as_it_reads_ascendv1(tiny_llama, tmp_path):
    """`msmodelslim convert` of the MindIE folder writes the compressed-tensors tensors that converting the ascendv1
    folder of the same run writes."""
    from msmodelslim.cli.__main__ import main

    out = tmp_path / "out"
    process = linear_quant(WRITTEN["w8a8_static"][0])
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", small_calib(tmp_path), process, BOTH))
    for folder in ("ascendv1", "mindie"):
        assert main(["convert", "--model_path", str(out / folder), "--save_path", str(tmp_path / f"ct-{folder}")]) == 0
    assert not list((tmp_path / "ct-mindie").glob("quant_model_description*"))
    ours, theirs = saved_tensors(tmp_path / "ct-mindie"), saved_tensors(tmp_path / "ct-ascendv1")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_check_finds_a_missing_shard_and_a_description_named_after_another_type(tiny_llama, tmp_path):
    from msmodelslim.app.check import check_checkpoint

    out = tmp_path / "out"
    qconfig = WRITTEN["w8a8_dynamic"][0]
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant(qconfig), [MINDIE])
    run_quant(tiny_llama, out, config)
    described = out / "quant_model_description_w8a8_dynamic.json"
    described.rename(out / "quant_model_description_w8a8.json")
    _, findings = check_checkpoint(out)
    assert any("is named quant_model_description_w8a8_dynamic.json" in f.message for f in findings)
    (out / "quant_model_description_w8a8.json").rename(described)
    next(out.glob("*.safetensors")).unlink()
    _, findings = check_checkpoint(out)
    assert any("has no tensor" in f.message for f in findings if f.level == "error")


def test_quarot_without_extra_info_writes_the_untied_head_into_the_copied_config(tmp_path):
    tied = make_tiny_model(tmp_path / "tied", "llama", tie=True)
    process = [{"type": "quarot", "export_extra_info": False}, *linear_quant(SCHEMES["w8a8_dynamic"])]
    out = tmp_path / "out"
    run_quant(tied, out, write_config(tmp_path / "c.yaml", small_calib(tmp_path), process, [MINDIE]))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    description = json.loads((out / "quant_model_description_w8a8_dynamic.json").read_text())
    assert description["lm_head.weight"] == "FLOAT" and not (out / "optional").exists()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    from transformers import AutoModelForCausalLM

    want = logits(AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval(), ids)
    got = logits(load_quantized_checkpoint(out), ids)
    assert ((got - want).norm() / want.norm()).item() < 0.05  # rotated and quantized, still the same model


C8 = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                           "method": "minmax"}}


@pytest.mark.parametrize("process, refusal", [
    (linear_quant(SCHEMES["w8a16"]), "mindie_format_saver does not write W8A16 in"),
    (linear_quant(SCHEMES["w8a8_dynamic_g16"]), "does not write W8A8_DYNAMIC per-group"),
    (linear_quant({"act": MXFP8, "weight": MXFP4}), "mindie_format_saver does not write W4A8_MXFP in"),
    ([C8, *linear_quant(SCHEMES["w8a8_dynamic"])], "dynamic_cache cannot be saved as mindie_format_saver"),
    ([{"type": "fa3_quant"}, *linear_quant(SCHEMES["w8a8_static"])], "FA3 entries for diffusion transformers only"),
    ([{"type": "quarot"}, *linear_quant(SCHEMES["w8a8_dynamic"])], "set export_extra_info: false"),
    ([{"type": "quarot", "online": True, "export_extra_info": False}, *linear_quant(SCHEMES["w4a4_dynamic"])],
     "QuaRot's run-time rotations"),
])
def test_what_the_mindie_layout_cannot_hold_is_refused_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch,
                                                                                 process, refusal):
    from msmodelslim.model import transformers_model

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(transformers_model.TransformersModel, "load_weights", no_weights)
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), process, [MINDIE])
    with pytest.raises(UnsupportedError, match=refusal):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["block:2", "description"])
def test_killed_mindie_run_resumes_to_identical_bytes(code, tmp_path, fault):  # noqa: F811  (code: the fixture)
    assert_killed_run_resumes_to_identical_bytes(code, tmp_path, [MINDIE], fault)


def test_vision_language_model_through_the_cli_check_and_read_back(tmp_path, images):
    from msmodelslim.cli.__main__ import main
    from test_vlm_models import SMOOTH_AND_QUANTIZE, adapter_of, original_model
    from tiny_vlm import PROMPT, image_samples, make_tiny_vlm

    model = make_tiny_vlm(tmp_path / "vlm", "qwen2_5_vl")
    config = tmp_path / "qwen2_5_vl_w8a8_mindie.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": SMOOTH_AND_QUANTIZE, "save": [MINDIE], "dataset": str(images[0].parent), "default_text": PROMPT}}))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Qwen2.5-VL-7B-Instruct", "--config_path", str(config)]) == 0
    assert list(out.glob("quant_model_description_*.json"))
    assert main(["check", str(out)]) == 0
    (batch,) = adapter_of("qwen2_5_vl", model).handle_dataset(image_samples(images[:1]), torch.device("cpu"))
    with torch.no_grad():
        want = original_model("qwen2_5_vl", model)(**batch, use_cache=False).logits.float()
        got = load_quantized_checkpoint(out)(**batch, use_cache=False).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 0.15
