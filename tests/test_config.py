"""The YAML protocol: valid configs parse, and every error names the offending field by its path."""
from pathlib import Path

import pytest
import yaml

from msmodelslim.core.config import load_config, parse_config
from msmodelslim.core.errors import ConfigError
from msmodelslim.quantizer.scheme import Scheme

REPO = Path(__file__).resolve().parents[1]
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}


def config_with(process, **spec):
    return {"apiversion": "modelslim_v1", "spec": {"process": process, **spec}}


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_bad_enum_names_path_and_choices():
    data = config_with([
        {"type": "linear_quant", "qconfig": {"weight": W8}},
        {"type": "linear_quant", "qconfig": {"act": {"scope": "per_tokn"}, "weight": W8}},
    ])
    assert "spec.process[1].qconfig.act.scope: 'per_tokn' is not one of per_tensor, per_token, per_channel, per_group" \
        in error_of(data)


def test_unknown_key_unknown_type_and_planned_processor():
    message = error_of(config_with([
        {"type": "linear_quant", "qconfig": {"weight": W8}, "inclde": ["*"]},
        {"type": "magic"},
        {"type": "online_quarot"},
    ]))
    assert "spec.process[0].inclde: unknown key" in message
    assert "spec.process[1].type: unknown processor type 'magic'" in message
    assert "spec.process[2].type: processor 'online_quarot' is not implemented yet" in message


def test_type_error_and_runner_enum():
    message = error_of(config_with([{"type": "linear_quant", "qconfig": {"weight": {**W8, "symmetric": "maybe"}}}],
                                   runner="fast"))
    assert "spec.runner: 'fast' is not one of auto, model_wise, layer_wise, dp_layer_wise" in message
    assert "spec.process[0].qconfig.weight.symmetric:" in message


def test_unsupported_pair_is_rejected_with_the_supported_list():
    message = error_of(config_with([{"type": "linear_quant", "qconfig": {
        "act": {"dtype": "int8", "scope": "per_token", "symmetric": True}, "weight": {**W8, "symmetric": False}}}]))
    assert "spec.process[0].qconfig" in message and "no deployable kernel" in message and "W8A8_DYNAMIC" in message


def test_per_group_needs_group_size_and_planned_method_is_named():
    message = error_of(config_with([
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "scope": "per_group"}}},
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "dtype": "hifloat8"}}},
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "method": "histogram"}}},
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "method": "gptq", "ext": {"percdamp": -1}}}},
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "method": "ssz", "ext": {"blocksize": 3}}}},
        {"type": "linear_quant", "qconfig": {"act": {"dtype": "int8", "scope": "per_token", "method": "histogram"},
                                             "weight": W8}},
        {"type": "linear_quant", "qconfig": {"weight": {**W8, "method": "autoround"}}},
    ]))
    assert "spec.process[0].qconfig.weight: scope per_group needs ext.group_size" in message
    assert "spec.process[1].qconfig.weight.dtype: dtype 'hifloat8' is not implemented yet" in message
    assert "spec.process[2].qconfig: weight method 'histogram' is for activations" in message
    assert "spec.process[3].qconfig.weight: ext.percdamp must be a positive float" in message
    assert "spec.process[4]" not in message  # an ext key the method does not read: ignored with a warning,
    # as upstream ignores it (tests/test_upstream_leniency.py)
    assert "spec.process[5].qconfig: act method histogram calibrates static int8 per_tensor activations only" in message
    assert "spec.process[6].qconfig.weight: method 'autoround' is tuned by the autoround_quant processor" in message


def test_apiversions():
    # its own use case, reached through the command line (tests/test_convert_weights.py)
    assert "run it as 'msmodelslim quant --model_path M" in error_of({"apiversion": "modelslim_convert", "spec": {}})
    assert "unknown" in error_of({"apiversion": "v9", "spec": {}})


def test_anchors_aliases_and_merge_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("""
apiversion: modelslim_v1
w8: &w8 {dtype: int8, scope: per_channel, symmetric: true, method: minmax}
dyn: &dyn
  act: {dtype: int8, scope: per_token, symmetric: true, method: minmax}
  weight: *w8
spec:
  process:
    - type: group
      configs:
        - {type: linear_quant, qconfig: *dyn, include: ["*mlp*"]}
        - type: linear_quant
          qconfig: {<<: *dyn, act: {dtype: float, method: none}}
          include: ["*attn*"]
""")
    config = load_config(path)
    group = config.spec.process[0]
    assert group.configs[0].qconfig.scheme == Scheme.W8A8_DYNAMIC
    assert group.configs[1].qconfig.scheme == Scheme.W8A16


def test_duplicate_keys_and_malformed_yaml(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("apiversion: modelslim_v1\nspec: {}\nspec: {}\n")
    with pytest.raises(ConfigError, match="duplicate key 'spec'"):
        load_config(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiversion: modelslim_v1\nspec: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "docs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_documented_examples_validate(path):
    config = load_config(path)
    assert config.spec.process, "an example with no processors teaches nothing"
    assert yaml.safe_load(path.read_text())["apiversion"] == "modelslim_v1"
