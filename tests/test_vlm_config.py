"""`apiversion: multimodal_vlm_modelslim_v1` (issue #24): the spec (runner always layer_wise, default_text, image
dataset by default), its errors, the shipped VLM practices and their lookup by --quant_type, and the app wiring that
keeps text and vision-language runs apart (before any weight is read)."""
import pytest
import yaml

from helpers import SCHEMES
from msmodelslim.app.analyze import refuse_vision_language
from msmodelslim.app.practice import LAB_PRACTICE, load_practice_file, select_practice
from msmodelslim.app.quantize import load_calibration
from msmodelslim.app.quantize_checks import refuse_mismatched_modality
from msmodelslim.cli.__main__ import main
from msmodelslim.core.config import (DEFAULT_VLM_DATASET, DEFAULT_VLM_TEXT, VLM_APIVERSION, RunnerType,
                                     VlmPracticeConfig, load_config, parse_config)
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.roadmap import NOT_YET
from msmodelslim.core.vlm_dataset import VlmCalibSample

W8A8_DYNAMIC = SCHEMES["w8a8_dynamic"]
LINEAR = {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"], "exclude": ["*lm_head"]}
# lab_practice folders of the VLM families: one YAML per mm_vlm row of protocol.md 3.4 whose features exist
VLM_FOLDERS = {"qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5_moe", "internvl3_5", "glm4_6v", "kimi_k2_5",
               "qwen2_5_omni_thinker", "qwen3_omni_moe"}


def vlm(spec: dict) -> dict:
    return {"apiversion": VLM_APIVERSION, "spec": spec}


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# ---- the spec ----------------------------------------------------------------------------------------------------
def test_defaults_and_the_vlm_flag():
    config = parse_config(vlm({"process": [LINEAR]}))
    assert isinstance(config, VlmPracticeConfig) and config.is_vlm
    assert config.spec.runner == RunnerType.layer_wise
    assert config.spec.dataset == DEFAULT_VLM_DATASET == "calibImages"
    assert config.spec.default_text == DEFAULT_VLM_TEXT == "Describe this image in detail."
    assert [s.type for s in config.spec.save] == ["ascendv1_saver"]
    assert not parse_config({"apiversion": "modelslim_v1", "spec": {"process": [LINEAR]}}).is_vlm
    assert VLM_APIVERSION not in NOT_YET["apiversion"]


@pytest.mark.parametrize("runner", ["auto", "model_wise", "dp_layer_wise"])
def test_another_runner_is_warned_about_and_replaced_by_layer_wise(runner, log_lines):
    config = parse_config(vlm({"runner": runner, "process": [LINEAR]}))
    assert config.spec.runner == RunnerType.layer_wise
    assert any(f"spec.runner {runner}" in line and "always layer_wise" in line for line in log_lines)


def test_layer_wise_and_a_saved_practice_parse_without_a_warning(log_lines):
    config = parse_config(vlm({"runner": "layer_wise", "process": [LINEAR], "default_text": "What is shown?"}))
    saved = config.model_dump(mode="json", exclude_none=True, exclude={"source_dir"})  # the *_best_practice.yaml
    again = parse_config(yaml.safe_load(yaml.safe_dump(saved)))
    assert again.is_vlm and again.spec == config.spec and again.spec.default_text == "What is shown?"
    assert not any("runner" in line for line in log_lines)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_default_text_must_be_a_real_prompt(text):
    message = error_of(vlm({"default_text": text}))
    assert "spec.default_text: must be a non-empty prompt" in message


def test_errors_name_the_field_and_vlm_fields_belong_to_vlm_configs():
    assert "spec.process[0].qconfig.act.scope: 'per_tokn' is not one of" in error_of(vlm({"process": [
        {**LINEAR, "qconfig": {**W8A8_DYNAMIC, "act": {**W8A8_DYNAMIC["act"], "scope": "per_tokn"}}}]}))
    assert "spec.images: unknown key" in error_of(vlm({"images": "x"}))
    prior = {"prior": [{"process": [{"type": "adapt_rotation", "stage": 1}]}],
             "process": [{"type": "adapt_rotation", "stage": 2}]}
    assert len(parse_config(vlm(prior)).spec.prior) == 1  # the LAOS stages, as in modelslim_v1
    assert "put adapt_rotation in spec.process" in error_of(vlm({"prior": [{"process": [{"type": "adapt_rotation", "stage": 2}]}]}))
    message = error_of({"apiversion": "modelslim_v1", "spec": {"default_text": "Describe."}})
    assert f"spec.default_text: a field of apiversion {VLM_APIVERSION}" in message
    assert "unknown saver type" in error_of(vlm({"save": [{"type": "safetensors_saver"}]}))


def test_both_savers_come_from_one_vlm_config():
    config = parse_config(vlm({"process": [LINEAR], "save": [{"type": "ascendv1_saver"},
                                                              {"type": "compressed_tensors", "part_file_size": 0}]}))
    assert [s.type for s in config.spec.save] == ["ascendv1_saver", "compressed_tensors"]


def test_a_vlm_file_loads_with_anchors(tmp_path):
    path = tmp_path / "vlm.yaml"
    path.write_text(f"""apiversion: {VLM_APIVERSION}
dyn: &dyn
  act: {{dtype: int8, scope: per_token, symmetric: true, method: minmax}}
  weight: {{dtype: int8, scope: per_channel, symmetric: true, method: minmax}}
spec:
  process:
    - {{type: linear_quant, qconfig: *dyn, include: ["*"]}}
  dataset: images
""")
    config = load_config(path)
    assert config.is_vlm and config.source_dir == tmp_path and config.spec.dataset == "images"


# ---- the shipped practices ---------------------------------------------------------------------------------------
VLM_PRACTICES = sorted(p for folder in VLM_FOLDERS for p in (LAB_PRACTICE / folder).glob("*.yaml"))


def test_every_vlm_family_folder_ships_practices():
    assert {p.parent.name for p in VLM_PRACTICES} == VLM_FOLDERS
    assert len(VLM_PRACTICES) >= 18


@pytest.mark.parametrize("path", VLM_PRACTICES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_vlm_practice_parses_and_names_its_models(path):
    practice = load_practice_file(path)
    config = practice.config
    assert config.is_vlm and config.spec.runner == RunnerType.layer_wise
    own_set = "calibVideos" if "omni" in path.parent.name else "calibImages"  # upstream's sets: the Omni rows video
    assert config.spec.dataset == own_set and config.spec.default_text == DEFAULT_VLM_TEXT
    assert config.spec.process and practice.metadata.description
    assert practice.metadata.model_types and "*" not in practice.metadata.model_types  # per published model


def test_no_two_practices_of_a_folder_compete_for_a_model_at_one_score():
    seen: dict[tuple, str] = {}
    for path in VLM_PRACTICES:
        meta = load_practice_file(path).metadata
        for model in meta.model_types:
            key = (path.parent.name, model, meta.label.model_dump_json(), meta.score)
            assert key not in seen, f"{path.name} and {seen[key]} tie for {model}"
            seen[key] = path.name


@pytest.mark.parametrize("model_type,pedigree,quant_type,config_id", [
    ("Qwen3-VL-30B-A3B", "qwen3_vl_moe", "w8a8", "qwen3_vl_moe-w8a8"),  # int8 first; the MXFP8 one by --config_path
    ("Qwen3-VL-Reranker-8B", "qwen3_vl", "w8a8", "qwen3_vl_embedding-w8a8"),
    ("Qwen3.5-397B-A17B", "qwen3_5_moe", "w4a8", "qwen3_5_moe-w4a8"),
    ("Qwen3.6-27B", "qwen3_5_moe", "w8a8", "qwen3_6_dense-w8a8"),
    ("InternVL3_5-241B-A28B", "internvl3_5", "w8a8", "internvl3_5_moe-w8a8"),
    ("Kimi-K2.6", "kimi_k2_5", "w4a8", "kimi_k2_6-w4a8"),
])
def test_quant_type_picks_the_vlm_practice_of_the_model(model_type, pedigree, quant_type, config_id):
    chosen = select_practice(model_type, pedigree, quant_type, vision_language=True)
    assert chosen.metadata.config_id == config_id and chosen.config.is_vlm


def test_a_vlm_without_a_practice_for_the_quant_type_is_refused_not_given_a_text_default():
    with pytest.raises(UnsupportedError) as info:
        select_practice("Qwen3-VL-4B-Instruct", "qwen3_vl", "w8a16", allow_default=True, vision_language=True)
    message = str(info.value)
    assert "no practice for the vision-language model Qwen3-VL-4B-Instruct (its practices: w8a8)" in message
    assert "--config_path" in message


# ---- app wiring --------------------------------------------------------------------------------------------------
class _TextAdapter:
    pass


class _VisionAdapter:
    is_vlm = True


def test_a_config_and_an_adapter_of_different_modalities_are_refused():
    text_config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [LINEAR]}})
    vlm_config = parse_config(vlm({"process": [LINEAR]}))
    refuse_mismatched_modality(text_config, _TextAdapter(), "Qwen3-8B")
    refuse_mismatched_modality(vlm_config, _VisionAdapter(), "Qwen3-VL-4B-Instruct")
    with pytest.raises(ConfigError, match="multimodal_vlm_modelslim_v1 .* but --model_type Qwen3-8B is a text model"):
        refuse_mismatched_modality(vlm_config, _TextAdapter(), "Qwen3-8B")
    with pytest.raises(ConfigError, match="Qwen3-VL-4B-Instruct is a vision-language model .*this one is modelslim_v1"):
        refuse_mismatched_modality(text_config, _VisionAdapter(), "Qwen3-VL-4B-Instruct")
    with pytest.raises(UnsupportedError, match="analyze works on text models"):
        refuse_vision_language(_VisionAdapter(), "analyze")
    refuse_vision_language(_TextAdapter(), "analyze")


def test_the_calibration_data_follows_the_config(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    vlm_config = parse_config(vlm({"dataset": "red.png_dir", "default_text": "Which colour?"}))
    (tmp_path / "red.png_dir").mkdir()
    (tmp_path / "red.png").rename(tmp_path / "red.png_dir" / "red.png")
    vlm_config.source_dir = tmp_path
    assert load_calibration(vlm_config) == [VlmCalibSample("Which colour?", (tmp_path / "red.png_dir" / "red.png"))]
    text_config = parse_config({"apiversion": "modelslim_v1", "spec": {"dataset": "test.json"}})
    assert all(isinstance(t, str) for t in load_calibration(text_config))


def test_cli_refuses_a_vlm_config_for_a_text_model_before_any_weight_is_read(tiny_llama, tmp_path, capsys,
                                                                            monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump(vlm({"process": [LINEAR]})))
    code = main(["quant", "--model_path", str(tiny_llama), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", "SmolLM2-135M", "--config_path", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "is a text model" in err and "multimodal_vlm_modelslim_v1" in err
    assert not (tmp_path / "out").exists()


def test_tune_takes_text_templates_only_and_refuses_a_vlm_one_before_anything_is_written(tiny_llama, tmp_path):
    from msmodelslim.app.tune import TuneRequest, tune

    plan = {"strategy": {"type": "binary_fallback", "template": vlm({"process": [LINEAR]}),
                         "rollback_path": "spec.process.0.exclude", "rollback_candidates": ["*layers.0.*"]},
            "evaluation": {"type": "command", "command": ["true", "{model}"],
                           "demand": {"expectations": [{"dataset": "d", "target": 1.0, "tolerance": 0}]}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfigError, match="strategy.template: must be a full practice with apiversion modelslim_v1"):
        tune(TuneRequest(model_path=tiny_llama, save_path=tmp_path / "out", config_path=path,
                         model_type="SmolLM2-135M"))
    assert not (tmp_path / "out").exists()
