"""Lenient where upstream is lenient, precise where it matters: planned features are named as not implemented
yet (with the work they belong to), upstream practice files work in the custom repository, --tag and --debug."""
import logging

import pytest

from helpers import SCHEMES, write_config
from msmodelslim.app.practice import select_practice
from msmodelslim.cli.__main__ import main
from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import ConfigError

W8 = SCHEMES["w8a16"]["weight"]


def _refusal(spec: dict, apiversion: str = "modelslim_v1") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": apiversion, "spec": spec})
    return str(info.value)


@pytest.mark.parametrize("spec,needle", [
    ({"process": [{"type": "online_quarot"}]}, "processor 'online_quarot' is not implemented yet (it belongs to the "
                                               "online rotations of text models; for now it runs on diffusion "
                                               "transformers' attention"),
    ({"process": [{"type": "linear_quant", "qconfig": {"weight": {**W8, "dtype": "hifloat8"}}}]},
     "dtype 'hifloat8' is not implemented yet (it belongs to the floating-point formats"),
    ({"process": [{"type": "linear_quant", "qconfig": {"weight": W8, "act": {**W8, "scope": "per_head"}}}]},
     "scope 'per_head' (one scale per attention head) is fa3_quant's"),
    ({"save": [{"type": "safetensors_saver"}]}, "unknown saver type 'safetensors_saver'; available: ascendv1_saver"),
])
def test_planned_features_are_named_not_implemented_yet(spec, needle):
    assert needle in _refusal(spec)


def test_every_upstream_saver_is_served():
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"save": [{"type": "mindie_format_saver"}]}})
    assert [s.type for s in config.spec.save] == ["mindie_format_saver"]  # for text models too (format/mindie.py)


def test_every_upstream_apiversion_is_served():
    assert "converts weights offline" in _refusal({}, "modelslim_convert")  # the convert use case, not parse_config
    assert parse_config({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {}}).is_vlm  # implemented (issue #24)


def test_ext_keys_a_method_does_not_read_are_ignored_with_a_warning(log_lines):
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "ext": {"use_sigma": True}}}}]}})
    assert config.spec.process[0].qconfig.weight.ext == {"use_sigma": True}
    assert any("['use_sigma'] are not used by method minmax" in line for line in log_lines)


UPSTREAM_PRACTICE = """apiversion: modelslim_v1
metadata:
  config_id: {name}
  score: {score}
  label: {{w_bit: 8, a_bit: 16}}
  verified_model_types: {models}
  verified_tags: {tags}
spec:
  process:
    - type: linear_quant
      qconfig:
        weight: {{dtype: int8, scope: per_channel, symmetric: true, method: minmax}}
      include: ["*"]
      exclude: ["lm_head"]
"""


def _custom_repo(tmp_path, monkeypatch, files: dict[str, str]):
    folder = tmp_path / "repo" / "llama"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setenv("MSMODELSLIM_CUSTOM_PRACTICE_REPO", str(tmp_path / "repo"))


def test_upstream_practice_files_work_and_a_broken_one_is_skipped(tmp_path, monkeypatch, log_lines):
    _custom_repo(tmp_path, monkeypatch, {
        "mine-w8a16": UPSTREAM_PRACTICE.format(name="mine-w8a16", score=99, models='["Llama-2-7B"]', tags="{}"),
        "broken": "apiversion: modelslim_v1\nmetadata: {config_id: other}\nspec: {process: [{type: nope}]}\n",
        "tagged-w8a16": UPSTREAM_PRACTICE.format(name="tagged-w8a16", score=100, models="[]",
                                                 tags='{"Llama-2-7B": [["MindIE", "Atlas_A2"]]}'),
    })
    assert select_practice("Llama-2-7B", "llama", "w8a16").metadata.config_id == "tagged-w8a16"  # no tags asked
    assert select_practice("Llama-2-7B", "llama", "w8a16", tags=("mindie",)).metadata.config_id == "tagged-w8a16"
    assert select_practice("Llama-2-7B", "llama", "w8a16", tags=("vllm",)).metadata.config_id == "mine-w8a16"
    assert select_practice("Llama-3-8B", "llama", "w8a16", allow_default=True).metadata.config_id != "mine-w8a16"
    assert any("skipping" in line and "broken.yaml" in line for line in log_lines)


def test_upstream_fa_quant_label_means_fa8():
    from msmodelslim.app.practice import PracticeLabel, parse_quant_type

    assert PracticeLabel(w_bit=8, a_bit=8, fa_quant=True) == parse_quant_type("w8a8f8")


def test_tag_and_debug_are_accepted(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a16"])
    code = main(["quant", "--model_path", str(tiny_llama), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", "Llama-2-7B", "--config_path", str(config), "--debug", "--tag", "MindIE",
                 "--dry_run"])
    assert code == 0
    assert logging.getLogger("msmodelslim").level == logging.DEBUG
