"""`apiversion: modelslim_v0` recipes: translated to the modelslim_v1 pipeline key by key, refused by name where
this version lacks the feature, found by the practice lookup, and run to the same bytes as their v1 equivalent.

The v0 specs below are written for these tests from protocol.md §3.4 (which keys each upstream row uses) and the
established tool's QuantConfig / AntiOutlierConfig / Calibrator documentation (their defaults)."""
from __future__ import annotations

import copy

import pytest
import yaml

from helpers import small_calib
from msmodelslim.app import practice
from msmodelslim.app.practice import select_practice
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.cli.__main__ import main
from msmodelslim.core.config import load_config, parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.v0 import translate_v0

W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
STATIC = {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}
DYNAMIC = {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}
DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
O_PROJ = [f"model.layers.{i}.self_attn.o_proj" for i in range(3)]
SAVE4 = {"calib_save_params": {"part_file_size": 4}}


def v1(spec: dict) -> dict:
    """The translated spec, after checking that the whole document validates as modelslim_v1."""
    out, notes = translate_v0(spec)
    parse_config({"apiversion": "modelslim_v1", "spec": out})
    assert notes
    return out


def refusal(spec: dict, error=UnsupportedError) -> str:
    with pytest.raises(error) as info:
        parse_config({"apiversion": "modelslim_v0", "spec": spec})
    return str(info.value)


def step(qconfig: dict, exclude: list[str], include=("*",)) -> dict:
    return {"type": "linear_quant", "qconfig": qconfig, "include": list(include), "exclude": exclude}


# ---- every row kind of protocol.md §3.4 -------------------------------------------------------------------------
def test_row_calib_w8a16():  # qwen1_5/qwen1.5-110b-w8a16, qwen2/qwen2-72b-w8a16: data-free int8 weights
    spec = {"calib_cfg": {"w_bit": 8, "a_bit": 16, "mm_tensor": False, "disable_names": DOWN}, **SAVE4}
    assert v1(spec) == {"process": [step({"weight": W8}, [*DOWN, "lm_head"])],
                        "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
                        "dataset": "teacher_qualification.jsonl"}  # the v0 default; W8A16 never reads it


def test_row_calib_w8a8():  # qwen2/qwen2-7b-w8a8, qwen2_5/qwen2.5-7b-w8a8: static W8A8, no outlier suppression
    spec = {"calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "disable_names": ["lm_head"]},
            "calib_dataset": "boolq.jsonl"}
    assert v1(spec) == {"process": [step({"act": STATIC, "weight": W8}, ["lm_head"])],
                        "save": [{"type": "ascendv1_saver", "part_file_size": 0}],  # no part_file_size: one file
                        "dataset": "boolq.jsonl"}


def test_row_anti_m4_w8a8():  # deepseek-r1-distill-qwen-*-w8a8: smoothing, then static W8A8
    out = v1({"anti_cfg": {"anti_method": "m4"},
              "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "disable_names": ["lm_head", *DOWN]}, **SAVE4})
    assert out["process"] == [{"type": "iter_smooth"}, step({"act": STATIC, "weight": W8}, ["lm_head", *DOWN])]


def test_row_anti_m4_w8a8_pdmix():  # qwen3/qwen3-32b-dense-w8a8: PD-mix activations
    out = v1({"anti_cfg": {"anti_method": "m4"},
              "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "pdmix": True, "disable_names": ["lm_head"]},
              "calib_dataset": "mix_calib.jsonl", **SAVE4})
    assert out["process"][1]["qconfig"]["act"] == {**STATIC, "scope": "pd_mix"}


def test_row_anti_m4_w8a8_pdmix_with_disable_level():  # qwen3/qwen3-14b-dense-w8a8 asks for automatic fallback
    message = refusal({"anti_cfg": {"anti_method": "m4"}, "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False,
                                                                       "pdmix": True},
                       "calib_params": {"disable_level": "L10"}})
    assert "disable_level: L10 (automatic fallback of the 10 linears" in message and "disable_names" in message


def test_row_anti_m4_w8a8_mix_cfg():  # qwen3_moe/qwen3-30b-a3b-w8a8: experts dynamic, the rest static
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    out = v1({"anti_cfg": {"anti_method": "m4"},
              "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "w_sym": True, "act_method": 1, "pr": 1.0,
                            "disable_names": routers},
              "calib_params": {"disable_level": "L0", "mix_cfg": {"*.mlp.*": "w8a8_dynamic", "*": "w8a8"}}})
    rollback = [*routers, "lm_head"]
    assert out["process"][1] == {"type": "group", "configs": [
        step({"act": DYNAMIC, "weight": W8}, rollback, include=["*.mlp.*"]),
        step({"act": STATIC, "weight": W8}, [*rollback, "*.mlp.*"]),  # '*' comes last: no separate default rule
    ]}


KV_STEP = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                                "method": "minmax"}}


def test_row_anti_m6_pdmix_kv():  # qwen2_5/qwen2.5-w8a8c8-pdmix
    spec = {"anti_cfg": {"anti_method": "m6", "flex_config": {"alpha": 0.75, "beta": 0.1},
                         "disable_anti_names": O_PROJ},
            "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "act_method": 2, "use_kvcache_quant": True,
                          "pdmix": True, "disable_names": [*DOWN, "lm_head"]},
            "calib_dataset": "qwen2.5_w8a8_pdmix_calib_prompt.jsonl",
            "anti_dataset": "qwen2.5_w8a8_pdmix_anti_prompt.jsonl", **SAVE4}
    assert "pdmix with act_method 2" in refusal(spec)  # histogram ranges for PD-mix, then the datasets
    spec["calib_cfg"]["act_method"] = 1
    assert "a separate dataset for the outlier suppression is not implemented" in refusal(spec)
    del spec["anti_dataset"]
    out = v1(spec)
    assert out["process"][0] == {"type": "flex_smooth_quant", "alpha": 0.75, "beta": 0.1, "exclude": O_PROJ}
    assert out["process"][1]["qconfig"]["act"]["scope"] == "pd_mix"
    assert out["process"][2] == KV_STEP


def test_row_calib_w8a8_kv():  # qwen2/qwen2-72b-w8a8c8
    spec = {"calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "use_kvcache_quant": True}}
    assert v1(spec)["process"][-1] == KV_STEP
    spec["calib_cfg"] = {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "use_fa_quant": True}
    assert v1(spec)["process"][-1] == {"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_head",
                                                                        "symmetric": True, "method": "minmax"}}
    spec["calib_cfg"]["fa_amp"] = 2
    assert "fa_amp: 2 (rolling the most sensitive attention layers back to float" in refusal(spec)


@pytest.mark.parametrize("calib,anti,ext", [
    # qwen2/qwen2-7b-w8a8s, qwq/qwq-32b-sparse, deepseek-r1-distill-*-sparse (with m4), qwen3-14b-w8a8s
    ({"w_bit": 4, "a_bit": 8, "mm_tensor": False, "is_lowbit": True, "co_sparse": True, "use_sigma": True,
      "fraction": 0.011, "sigma_factor": 4.0, "disable_names": ["lm_head"]}, None,
     {"w_bit": 4, "fraction": 0.011, "use_sigma": True, "sigma_factor": 4.0, "nonuniform": False}),
    ({"w_bit": 4, "a_bit": 8, "mm_tensor": False, "is_lowbit": True, "act_method": 2}, {"anti_method": "m4"},
     {"w_bit": 4, "fraction": 0.01, "use_sigma": False, "sigma_factor": 3.0, "nonuniform": False}),
    # qwen3/qwen3-8b-w8a8s: m6 and float down_proj through mix_cfg
    ({"w_bit": 4, "a_bit": 8, "mm_tensor": False, "is_lowbit": True, "fraction": 0.012}, {"anti_method": "m6"},
     {"w_bit": 4, "fraction": 0.012, "use_sigma": False, "sigma_factor": 3.0, "nonuniform": False}),
])
def test_rows_lowbit_sparse_become_w8a8s(calib, anti, ext):
    spec = {"calib_cfg": calib, "calib_params": {"mix_cfg": {"model.layers.*.mlp.down_proj": "float"}}}
    if anti:
        spec["anti_cfg"] = anti
    out = v1(spec)
    quant = next(step for step in out["process"] if step["type"] in ("linear_quant", "group"))
    rules = quant["configs"] if quant["type"] == "group" else [quant]
    weights = [r["qconfig"]["weight"] for r in rules]
    assert {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "lowbit_sparse", "ext": ext} in weights
    sparse = next(r for r in rules if r["qconfig"]["weight"]["method"] == "lowbit_sparse")
    assert sparse["qconfig"]["act"]["scope"] == "per_tensor"
    assert sparse["qconfig"]["act"]["method"] == ("histogram" if calib.get("act_method") == 2 else "minmax")


def test_row_co_sparse_without_lowbit_is_refused_by_name():  # qwen2_5/qwen2.5-sparse
    spec = {"calib_cfg": {"w_bit": 4, "a_bit": 8, "mm_tensor": False, "is_lowbit": False, "co_sparse": True,
                          "fraction": 0.02}}
    message = refusal(spec)
    assert "co_sparse: true without is_lowbit" in message and "is not implemented yet" in message


# ---- anti_cfg ---------------------------------------------------------------------------------------------------
CALIB_W8A8 = {"w_bit": 8, "a_bit": 8, "mm_tensor": False}


def test_anti_methods():
    smooth = lambda anti, calib=CALIB_W8A8: v1({"anti_cfg": anti, "calib_cfg": calib})["process"][0]  # noqa: E731
    assert smooth({"anti_method": "m1", "disable_anti_names": O_PROJ}) == {"type": "smooth_quant", "alpha": 0.5}
    assert smooth({"anti_method": "m4", "disable_anti_names": O_PROJ}) == {"type": "iter_smooth", "exclude": O_PROJ}
    assert smooth({"anti_method": "m6"}) == {"type": "flex_smooth_quant", "act_scope": "per_tensor"}  # searched
    assert smooth({"anti_method": "m6"}, {**CALIB_W8A8, "is_dynamic": True}) == {"type": "flex_smooth_quant"}
    assert smooth({"anti_method": "m6", "flex_config": {"alpha": 0.5, "beta": None}}) == {
        "type": "flex_smooth_quant", "alpha": 0.5, "act_scope": "per_tensor"}
    w4g = {"w_bit": 4, "a_bit": 16, "is_lowbit": True, "open_outlier": False, "group_size": 32}
    assert smooth({"anti_method": "m3", "a_bit": 16}, w4g) == {
        "type": "awq", "enable_subgraph_type": ["norm-linear"],
        "weight_qconfig": {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": "minmax",
                           "ext": {"group_size": 32}}}


@pytest.mark.parametrize("anti,needle,error", [
    ({}, "m2 (outlier suppression with a per-channel shift", UnsupportedError),  # upstream's default method
    ({"anti_method": "m5"}, "m5 (CBQ) is not implemented", UnsupportedError),
    ({"anti_method": "m7"}, "'m7' is not one of m1", ConfigError),
    ({"anti_method": "m4", "a_bit": 16}, "a_bit: 16 needs anti_method m3", ConfigError),
    ({"anti_method": "m4", "w_sym": False}, "w_sym: false needs anti_method m3", ConfigError),
    ({"anti_method": "m6", "flex_config": {"gamma": 1.0}}, "flex_config.gamma: unknown key", ConfigError),
    ({"anti_method": "m6", "flex_config": {"alpha": 2}}, "flex_config.alpha: expected a number in [0, 1]", ConfigError),
    ({"anti_method": "m4", "dev_type": "npu"}, "anti_cfg.dev_type: not allowed", ConfigError),
    ({"anti_method": "m4", "disable_anti_names": ["*.o_proj"]}, "is not a module name", ConfigError),
    ({"anti_method": "m4", "alpha": 0.9}, "anti_cfg.alpha: unknown modelslim_v0 key", ConfigError),
])
def test_anti_refusals(anti, needle, error):
    assert needle in refusal({"anti_cfg": anti, "calib_cfg": CALIB_W8A8}, error)


# ---- calib_cfg --------------------------------------------------------------------------------------------------
def quant(calib: dict) -> dict:
    return v1({"calib_cfg": calib})["process"][0]["qconfig"]


def test_schemes():
    assert quant({**CALIB_W8A8, "is_dynamic": True}) == {"act": DYNAMIC, "weight": W8}
    assert quant({**CALIB_W8A8, "act_method": 2})["act"] == {**STATIC, "method": "histogram"}
    w8a16_asym = quant({"w_bit": 8, "a_bit": 16, "mm_tensor": False, "w_sym": False})
    assert w8a16_asym == {"weight": {**W8, "symmetric": False}}
    assert quant({"w_bit": 4, "a_bit": 16, "mm_tensor": False}) == {"weight": {**W8, "dtype": "int4"}}
    per_group = quant({"w_bit": 4, "a_bit": 16, "is_lowbit": True, "open_outlier": False, "group_size": 128,
                       "w_method": "GPTQ", "percdamp": 0.05})  # mm_tensor does not apply to per-group weights
    assert per_group == {"weight": {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": "gptq",
                                    "ext": {"group_size": 128, "percdamp": 0.05}}}
    assert quant({**CALIB_W8A8, "is_dynamic": True, "w_method": "GPTQ"})["weight"]["method"] == "gptq"


@pytest.mark.parametrize("calib,needle,error", [
    ({"w_bit": 8, "a_bit": 8}, "mm_tensor: true (one weight scale per tensor; upstream's default", UnsupportedError),
    ({**CALIB_W8A8, "act_method": 3}, "act_method: 3 (the per-layer choice between histogram and min-max",
     UnsupportedError),
    ({**CALIB_W8A8, "act_method": 4}, "act_method: 4 is not one of", ConfigError),
    ({**CALIB_W8A8, "w_method": "HQQ", "is_dynamic": True}, "HQQ (half-quadratic", UnsupportedError),
    ({"w_bit": 4, "a_bit": 16, "mm_tensor": False, "w_method": "NF"}, "NF (NF4", UnsupportedError),
    ({**CALIB_W8A8, "w_method": "GPTQ"}, "GPTQ does not support static W8A8", ConfigError),
    ({**CALIB_W8A8, "w_method": "gptq"}, "'gptq' is not one of MinMax, GPTQ, HQQ, NF", ConfigError),
    ({**CALIB_W8A8, "pr": 0.5}, "pr: 0.5 (QDrop", UnsupportedError),
    ({**CALIB_W8A8, "w_sym": False}, "w_sym: false needs a_bit 16", ConfigError),
    ({"w_bit": 4, "a_bit": 16, "mm_tensor": False, "w_sym": False}, "asymmetric int4 weights", UnsupportedError),
    ({"w_bit": 4, "a_bit": 4, "is_dynamic": True}, "W4A4 (a_bit 4) is not implemented yet (it belongs to the low-bit",
     UnsupportedError),
    ({"w_bit": 16, "a_bit": 16}, "w_bit 16 with a_bit 16 is not a modelslim_v0 scheme", ConfigError),
    ({"w_bit": 8, "a_bit": 16, "is_dynamic": True}, "is_dynamic: true needs a_bit 8", ConfigError),
    ({**CALIB_W8A8, "is_dynamic": True, "pdmix": True}, "pdmix: true needs static W8A8", ConfigError),
    ({"w_bit": 4, "a_bit": 8, "is_dynamic": True, "is_lowbit": True, "open_outlier": False},
     "W4A8_DYNAMIC with per-group int4 weights is not implemented", UnsupportedError),
    ({"w_bit": 4, "a_bit": 8, "is_dynamic": True}, "w_bit 4 with a_bit 8 is upstream's sparse", ConfigError),
    ({**CALIB_W8A8, "is_lowbit": True}, "low-bit automatic accuracy tuning", UnsupportedError),
    ({"w_bit": 8, "a_bit": 16, "is_lowbit": True, "open_outlier": False, "group_size": 48}, "group_size: 48 is not",
     ConfigError),
    ({**CALIB_W8A8, "disable_last_linear": False}, "disable_last_linear: false (quantize the last linear, lm_head)",
     UnsupportedError),
    ({**CALIB_W8A8, "disable_names": ["model.layers.*.mlp.down_proj"]}, "is not a module name", ConfigError),
    ({**CALIB_W8A8, "mm_tensor": "no"}, "calib_cfg.mm_tensor: expected true or false", ConfigError),
    ({**CALIB_W8A8, "dev_type": "npu"}, "calib_cfg.dev_type: not allowed in a modelslim_v0 file (the device comes",
     ConfigError),
    ({**CALIB_W8A8, "kv_sym": True}, "calib_cfg.kv_sym: unknown modelslim_v0 key (QuantConfig takes w_bit, a_bit",
     ConfigError),
])
def test_calib_refusals(calib, needle, error):
    assert needle in refusal({"calib_cfg": calib}, error)


def test_keys_without_effect_are_named_in_a_warning():
    _, notes = translate_v0({"calib_cfg": {**CALIB_W8A8, "is_dynamic": True, "act_method": 2, "fraction": 0.05,
                                           "group_size": 128, "dev_id": 3}, "batch_size": 8})
    warned = {n.key for n in notes if n.warning}
    assert warned == {"calib_cfg.act_method", "calib_cfg.fraction", "calib_cfg.group_size", "calib_cfg.dev_id"}
    assert any(str(n).startswith("v0 batch_size 8 ignored") for n in notes)


# ---- calib_params, datasets, saver, unknown keys ----------------------------------------------------------------
def test_mix_cfg_exact_names_first_then_globs_in_order():
    out = v1({"calib_cfg": CALIB_W8A8, "calib_params": {"mix_cfg": {
        "*down*": "w8a16", "model.layers.0.mlp.down_proj": "w8a8_dynamic", "*q_proj": "float"}}})
    rules = out["process"][0]["configs"]
    assert [(r["include"], r["exclude"]) for r in rules] == [
        (["model.layers.0.mlp.down_proj"], ["lm_head"]),
        (["*down*"], ["lm_head", "model.layers.0.mlp.down_proj"]),
        (["*"], ["lm_head", "model.layers.0.mlp.down_proj", "*down*", "*q_proj"]),  # q_proj stays float
    ]
    assert [r["qconfig"] for r in rules] == [{"act": DYNAMIC, "weight": W8}, {"weight": W8},
                                             {"act": STATIC, "weight": W8}]


@pytest.mark.parametrize("spec,needle,error", [
    ({"calib_params": {"mix_cfg": {"*{q,k}_proj": "float"}}}, "braces are literal in modelslim_v0", ConfigError),
    ({"calib_params": {"mix_cfg": {"*": "w8a4"}}}, "'w8a4' is not one of float, w8a8", ConfigError),
    ({"calib_params": {"mix_cfg": {"*mlp*": "w4a8_dynamic"}}}, "only for DeepSeek-V2", UnsupportedError),
    ({"calib_cfg": {**CALIB_W8A8, "pdmix": True}, "calib_params": {"mix_cfg": {"*mlp*": "w8a16"}}},
     "w8a16 cannot be derived from calib_cfg", ConfigError),
    ({"calib_params": {"disable_level": "L01"}}, "'L01' is not L0, L1", ConfigError),
    ({"calib_params": {"all_tensors": {"x": 1}}}, "all_tensors: tensors cannot be given", ConfigError),
    ({"calib_params": {"mix": {}}}, "calib_params.mix: unknown modelslim_v0 key (Calibrator takes", ConfigError),
    ({"calib_save_params": {"part_file_size": 0}}, "part_file_size: 0 must be at least 1", ConfigError),
    ({"calib_save_params": {"safetensors_name": "w.safetensors"}}, "output file names are fixed", UnsupportedError),
    ({"calib_save_params": {"save_type": ["numpy"]}}, "save_type: not allowed", ConfigError),
    ({"calib_dataset": None}, "calib_dataset: null means no calibration data", ConfigError),
    ({"anti_params": {"norm": "RMSNorm"}}, "anti_params.norm: unknown modelslim_v0 key", ConfigError),
    ({"calib_datset": "boolq.jsonl"}, "spec.calib_datset: unknown modelslim_v0 key", ConfigError),
])
def test_other_refusals(spec, needle, error):
    spec = {"calib_cfg": CALIB_W8A8, **spec}
    assert needle in refusal(spec, error)


def test_datasets():
    anti = {"anti_cfg": {"anti_method": "m4"}, "calib_cfg": CALIB_W8A8}
    assert v1({**anti, "calib_dataset": "cn_en.jsonl", "anti_dataset": "cn_en.jsonl"})["dataset"] == "cn_en.jsonl"
    data_free = {"anti_cfg": {"anti_method": "m4"}, "calib_cfg": {"w_bit": 8, "a_bit": 16, "mm_tensor": False}}
    # only the smoothing reads data: its own dataset is the run's dataset
    assert v1({**data_free, "anti_dataset": "cn_en.jsonl"})["dataset"] == "cn_en.jsonl"
    assert "dataset" not in v1({"calib_cfg": {"w_bit": 8, "a_bit": 16, "mm_tensor": False}, "calib_dataset": None})


def test_error_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v0", "spec": {"calib_cfg": {**CALIB_W8A8, "wbit": 8}}}))
    with pytest.raises(ConfigError, match=rf"^{path}: spec.calib_cfg.wbit: unknown modelslim_v0 key"):
        load_config(path)


# ---- practice lookup --------------------------------------------------------------------------------------------
V0_PRACTICE = {"apiversion": "modelslim_v0",
               "metadata": {"config_id": "llama-v0-w8a8", "score": 95, "verified_model_types": ["Llama-2-7B"],
                            "label": {"w_bit": 8, "a_bit": 8, "is_sparse": False, "kv_cache": False}},
               "spec": {"anti_cfg": {"anti_method": "m4"}, "calib_cfg": {**CALIB_W8A8, "disable_names": ["lm_head"]},
                        "calib_dataset": "boolq.jsonl", **SAVE4}}


def test_v0_practices_are_found_by_their_metadata(tmp_path, monkeypatch, log_lines):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "llama-v0-w8a8.yaml").write_text(yaml.safe_dump(V0_PRACTICE))
    tagged = copy.deepcopy(V0_PRACTICE)
    tagged["metadata"].update(config_id="llama-v0-w8a16", verified_model_types=[],
                              verified_tags={"Llama-2-7B": [["MindIE", "Atlas_A2_Inference"]]},
                              label={"w_bit": 8, "a_bit": 16})
    tagged["spec"]["calib_cfg"]["a_bit"] = 16
    (folder / "llama-v0-w8a16.yaml").write_text(yaml.safe_dump(tagged))
    refused = copy.deepcopy(V0_PRACTICE)  # fa_amp is not implemented yet: the file is skipped, the others still serve
    refused["metadata"].update(config_id="llama-v0-w8a8f8", label={"w_bit": 8, "a_bit": 8, "fa_quant": True})
    refused["spec"]["calib_cfg"].update(use_fa_quant=True, fa_amp=1)
    (folder / "llama-v0-w8a8f8.yaml").write_text(yaml.safe_dump(refused))
    monkeypatch.setenv(practice.CUSTOM_REPO_ENV, str(tmp_path))

    chosen = select_practice("Llama-2-7B", "llama", "w8a8")
    assert chosen.metadata.config_id == "llama-v0-w8a8"
    assert [s.type for s in chosen.config.spec.process] == ["iter_smooth", "linear_quant"]
    assert chosen.config.translation is not None
    assert select_practice("Llama-2-7B", "llama", "w8a16", tags=("mindie",)).metadata.config_id == "llama-v0-w8a16"
    assert any("skipping" in line and "llama-v0-w8a8f8.yaml" in line and "fa_amp" in line
               for line in log_lines)


# ---- end to end -------------------------------------------------------------------------------------------------
def files(out) -> dict[str, bytes]:
    """Every file of an output but the run marker (it records the time and pid of the run that wrote it)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".msmodelslim.json"}


def test_v0_run_equals_its_v1_translation_and_the_hand_written_v1(tiny_llama, tmp_path, capsys):
    """anti m4 + static W8A8 with a float layer: the v0 file, the YAML --dry_run prints for it, and the same
    pipeline written by hand as modelslim_v1 give byte-identical outputs."""
    calib = small_calib(tmp_path)
    v0 = tmp_path / "v0.yaml"
    v0.write_text(yaml.safe_dump({"apiversion": "modelslim_v0", "spec": {
        "anti_cfg": {"anti_method": "m4"},
        "calib_cfg": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "disable_names": ["model.layers.1.mlp.down_proj"]},
        "calib_dataset": calib, "calib_save_params": {"part_file_size": 1}}}))
    hand = tmp_path / "v1.yaml"
    hand.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": [{"type": "iter_smooth"},
                    {"type": "linear_quant", "qconfig": {"act": STATIC, "weight": W8},
                     "exclude": ["model.layers.1.mlp.down_proj", "lm_head"]}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 1}], "dataset": calib}}))
    common = ["quant", "--model_path", str(tiny_llama), "--model_type", "Llama-2-7B", "--device", "cpu"]

    assert main([*common, "--config_path", str(v0), "--save_path", str(tmp_path / "dry"), "--dry_run"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    translated = tmp_path / "translated.yaml"
    translated.write_text(printed)
    plan_text = printed.split("# plan:\n")[1].split("# ESTIMATES for the real run")[0]  # the dry run's estimates follow
    plan = [line.removeprefix("# ") for line in plan_text.splitlines()]
    assert "FLOAT          model.layers.1.mlp.down_proj" in plan and len(plan) == 15  # 2 layers x 7, lm_head
    assert "v0 anti_cfg.anti_method m4 -> iter_smooth (norm-linear, v-o and up-down subgraphs)" in captured.err

    outputs = {}
    for name, config in (("v0", v0), ("translated", translated), ("v1", hand)):
        outputs[name] = tmp_path / name
        report = quantize(QuantizeRequest(model_path=tiny_llama, save_path=outputs[name], model_type="Llama-2-7B",
                                          device=DeviceSpec("cpu"), config_path=config))
        assert report.plan["model.layers.1.mlp.down_proj"] == "FLOAT"
        assert report.plan["model.layers.0.mlp.up_proj"] == "W8A8"
        assert (report.translated_config is not None) == (name == "v0")
        assert [f"{s:14s} {n}" for n, s in report.plan.items()] == plan
    reference = files(outputs["v1"])
    assert any(name.endswith(".safetensors") for name in reference)
    assert files(outputs["v0"]) == reference
    assert files(outputs["translated"]) == reference
