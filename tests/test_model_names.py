"""--model_type names: every upstream text-family name accepted as spelled there, the vision-language and diffusion
names refused by name, per-name pedigrees, same-family hints, and the docs table generated from the registry."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from msmodelslim.app.practice import select_practice
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.core.roadmap import DIFFUSION, PLANNED_MODEL_FAMILIES, VLM
from msmodelslim.model import registry
from msmodelslim.model.families import Qwen2Adapter
from msmodelslim.model.registry import AdapterEntry, name_family, resolve, same_family

REPO = Path(__file__).resolve().parents[1]

# The established tool's registry (protocol.md 5.1): adapter key -> its --model_type names, exactly as spelled there.
UPSTREAM_TEXT = {
    "default": ["default"],
    "deepseek_v3": ["DeepSeek-V3", "DeepSeek-V3-0324", "DeepSeek-R1", "DeepSeek-R1-0528", "DeepSeek-V3.1",
                    "DeepSeek-V3.1-Terminus"],
    "deepseek_v3_2": ["DeepSeek-V3.2-Exp", "DeepSeek-V3.2"],
    "deepseek_v4": ["DeepSeek-V4-Flash", "DeepSeek-V4-Pro"],
    "glm_5": ["GLM-5", "GLM-5.1"],
    "qwen1_5": ["Qwen1.5-110B"],
    "qwen2": ["Qwen2-7B", "Qwen2-7B-Instruct", "Qwen2-72B"],
    "qwen2_5": ["Qwen2.5-7B-Instruct", "Qwen2.5-32B-Instruct", "Qwen2.5-72B-Instruct", "Qwen2.5-Coder-7B-Instruct",
                "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B"],
    "qwen3": ["Qwen3-8B", "Qwen3-14B", "Qwen3-32B"],
    "qwen3_moe": ["Qwen3-30B", "Qwen3-235B", "Qwen3-Coder-480B-A35B"],
    "qwq": ["Qwen-QwQ-32B", "QwQ-32B"],
    "qwen3_next": ["Qwen3-Next-80B-A3B-Instruct"],
    "glm4_moe": ["GLM-4.5", "GLM-4.6", "GLM-4.7"],
    "glm4_moe_lite": ["GLM-4.7-Flash"],
    "kimi_k2": ["Kimi-K2-Instruct-0905", "Kimi-K2-Thinking"],
    "minimax_m2": ["MiniMax-M2.7"],
    "longcat_flash": ["LongCat-Flash-Chat"],
    "step3_5_flash": ["Step-3.5-Flash"],
}
UPSTREAM_VLM = {
    "qwen3_vl": ["Qwen3-VL-4B-Instruct", "Qwen3-VL-32B-Instruct", "Qwen3-VL-Embedding-2B", "Qwen3-VL-Embedding-8B",
                 "Qwen3-VL-Reranker-2B", "Qwen3-VL-Reranker-8B"],
    "qwen3_vl_moe": ["Qwen3-VL-30B-A3B", "Qwen3-VL-235B-A22B"],
    "qwen3_omni_moe": ["Qwen3-Omni-30B-A3B-Thinking", "Qwen3-Omni-30B-A3B-Instruct"],
    "qwen2_5_vl": ["Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-72B-Instruct", "Qwen2.5-VL-32B-Instruct"],
    "qwen2_5_omni_thinker": ["Qwen2.5-Omni-7B"],
    "qwen3_5_moe": ["Qwen3.5-397B-A17B", "Qwen3.5-27B", "Qwen3.5-122B-A10B", "Qwen3.5-35B-A3B", "Qwen3.6-27B"],
    "glm4_6v": ["GLM-4.6V"],
    "kimi_k2_5": ["Kimi-K2.5"],
    "kimi_k2_6": ["Kimi-K2.6"],
    "internvl3_5_dense": ["InternVL3_5-38B"],
    "internvl3_5_moe": ["InternVL3_5-241B-A28B"],
}
UPSTREAM_DIFFUSION = {
    "wan2_1": ["Wan2_1", "Wan2.1"],
    "wan2_2": ["Wan2_2", "Wan2.2"],
    "wan2_2_t2v": ["Wan2.2-T2V-A14B"],
    "wan2_2_i2v": ["Wan2.2-I2V-A14B"],
    "wan2_2_ti2v": ["Wan2.2-TI2V-5B"],
    "hunyuan_video": ["HunyuanVideo", "hunyuan_video", "hunyuan-video", "hunyuanvideo"],
    "flux1": ["FLUX.1-dev"],
    "qwen_image_edit": ["Qwen-Image-Edit-2509"],
}
VLM_MESSAGE = "vision-language models are not supported yet (issue: VLM pipeline)"
DIFFUSION_MESSAGE = ("this diffusion family is not supported yet (issue: diffusion pipeline; Wan2.1, Wan2.2-T2V-A14B, "
                     "Wan2.2-TI2V-5B, Wan2.2-I2V-A14B, FLUX.1-dev, Qwen-Image-Edit-2509 and HunyuanVideo are)")


def _names(families: dict[str, list[str]]) -> list[str]:
    return [n for names in families.values() for n in names]


def test_the_upstream_list_is_complete():
    keys = {**UPSTREAM_TEXT, **UPSTREAM_VLM, **UPSTREAM_DIFFUSION}
    assert len(keys) == 37
    assert len(_names(keys)) == 78


def test_every_upstream_text_name_is_registered_as_spelled_there():
    table = registry.registered_adapters()
    missing = [n for n in _names(UPSTREAM_TEXT) if n not in table]
    assert not missing, f"upstream --model_type names missing from msmodelslim/model/adapters.ini: {missing}"
    wrong_key = {n: table[n].key for key, names in UPSTREAM_TEXT.items() for n in names if table[n].key != key}
    assert not wrong_key, f"registered under another adapter key than upstream's: {wrong_key}"


def _still_planned(families: dict[str, list[str]]) -> dict[str, list[str]]:
    """The upstream multimodal families not implemented yet (an implemented one leaves PLANNED_MODEL_FAMILIES)."""
    return {key: names for key, names in families.items() if key in PLANNED_MODEL_FAMILIES}


@pytest.mark.parametrize("name,message", [(n, VLM_MESSAGE) for n in _names(_still_planned(UPSTREAM_VLM))]
                         + [(n, DIFFUSION_MESSAGE) for n in _names(_still_planned(UPSTREAM_DIFFUSION))])
def test_vision_language_and_diffusion_names_are_refused_naming_what_is_missing(name, message):
    with pytest.raises(UnsupportedError) as info:
        registry.lookup(name)
    assert message in str(info.value) and repr(name) in str(info.value)
    with pytest.raises(UnsupportedError, match=re.escape(message)):
        registry.lookup(name.upper())  # the family is what is refused, in any spelling


def test_the_roadmap_table_holds_exactly_the_upstream_multimodal_names():
    planned = {key: (work, list(names)) for key, (work, names) in PLANNED_MODEL_FAMILIES.items()}
    upstream = {key: (work, names) for work, families in ((VLM, UPSTREAM_VLM), (DIFFUSION, UPSTREAM_DIFFUSION))
                for key, names in families.items()}
    table = registry.registered_adapters()
    implemented = {key for key, (_, names) in upstream.items() if key not in planned}
    assert planned == {key: upstream[key] for key in upstream if key not in implemented}
    # an implemented vision-language family is registered under upstream's key, every name as spelled there
    wrong = [n for key in implemented if upstream[key][0] == VLM for n in upstream[key][1]
             if n not in table or table[n].key != key]
    assert not wrong, f"implemented multimodal names not registered under their upstream key: {wrong}"


def test_a_planned_name_is_refused_before_the_checkpoint_is_looked_at(tmp_path, monkeypatch, capsys):
    """Every upstream family has an adapter now (the table is empty); a family added to the roadmap is refused by
    name, before anything is read. A made-up planned name stands for it."""
    from msmodelslim.core import roadmap

    def fail(*_args, **_kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", fail)
    monkeypatch.setitem(roadmap.PLANNED_MODEL_TYPES, "future-vl-1b", ("future_vl", roadmap.VLM))
    from msmodelslim.cli.__main__ import main

    code = main(["quant", "--model_path", str(tmp_path), "--save_path", str(tmp_path / "o"), "--device", "cpu",
                 "--model_type", "Future-VL-1B", "--quant_type", "w8a8"])
    assert code == 2 and not (tmp_path / "o").exists()
    assert "future_vl adapter" in capsys.readouterr().err


# ---- pedigrees -----------------------------------------------------------------------------------------------
def test_distill_and_qwen1_5_run_on_the_qwen2_adapter_with_their_own_practices():
    table = registry.registered_adapters()
    for name, key, pedigree in [("DeepSeek-R1-Distill-Qwen-1.5B", "qwen2_5", "deepseek-r1-distill"),
                                ("DeepSeek-R1-Distill-Qwen-7B", "qwen2_5", "deepseek-r1-distill"),
                                ("Qwen1.5-110B", "qwen1_5", "qwen1_5"), ("Qwen2.5-7B-Instruct", "qwen2_5", "qwen2_5")]:
        assert (table[name].key, table[name].pedigree) == (key, pedigree)
        assert registry.adapter_class(name) is Qwen2Adapter
        for quant_type in ("w8a8", "w8a16"):
            chosen = select_practice(name, table[name].pedigree, quant_type)
            assert chosen.path.parent.name == pedigree and chosen.metadata.config_id == f"{pedigree}-{quant_type}"


def test_a_pedigree_for_an_unregistered_name_is_an_error(tmp_path):
    ini = tmp_path / "adapters.ini"
    ini.write_text("[ModelAdapter]\nqwen2 = Qwen2-7B\n[ModelAdapterEntryPoints]\n"
                   "qwen2 = msmodelslim.model.families:Qwen2Adapter\n[ModelPedigree]\nQwen2-8B = qwen2\n")
    with pytest.raises(InvalidModelError, match="names 'Qwen2-8B', which no adapter serves"):
        registry.registered_adapters(ini, include_entry_points=False)


# ---- hints from the same family --------------------------------------------------------------------------------
def _table(*names: str) -> dict[str, AdapterEntry]:
    return {n: AdapterEntry("msmodelslim.model.families:LlamaAdapter", "llama", "llama") for n in names}


TABLE = _table("SmolLM2-135M", "SmolLM2-360M-Instruct", "Llama-2-7B", "Llama-3-8B", "Llama-3.1-8B-Instruct",
               "Qwen2-7B", "Qwen2.5-7B-Instruct", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "QwQ-32B", "GLM-4.5",
               "DeepSeek-V3", "DeepSeek-V3.1", "DeepSeek-R1", "default")


@pytest.mark.parametrize("name,brand,line", [
    ("Qwen3-30B", "qwen", "qwen3"), ("GLM-5.1", "glm", "glm-5"), ("DeepSeek-V3.1-Terminus", "deepseek", "deepseek-v3"),
    ("Llama-3.1-8B-Instruct", "llama", "llama-3"), ("QwQ-32B", "qwq", None), ("SmolLM2-135M", "smollm", "smollm2"),
    ("Qwen2.5-7B-Instruct", "qwen", "qwen2"), ("LongCat-Flash-Chat", "longcat", None),
])
def test_the_family_of_a_name(name, brand, line):
    assert name_family(name) == (brand, line)


@pytest.mark.parametrize("name,family,expected", [
    ("Qwen3-4B", "Qwen3", ["Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B"]),  # the line first
    ("Llama-3.3-70B", "Llama-3", ["Llama-3-8B", "Llama-3.1-8B-Instruct"]),
    ("DeepSeek-V3.2", "DeepSeek-V3", ["DeepSeek-V3", "DeepSeek-V3.1"]),
    ("GLM-5.1", "GLM", ["GLM-4.5"]),  # no GLM-5 line: the brand
    ("Mistral-7B-v0.3", "Mistral", []),
])
def test_hints_come_from_the_same_family(name, family, expected):
    spelled, members = same_family(name, list(TABLE))
    assert spelled == family and sorted(members) == sorted(expected)


def test_an_unknown_name_of_an_unknown_family_names_the_families_and_the_default_adapter():
    with pytest.raises(ConfigError) as info:
        registry.lookup("Mistral-7B-v0.3", TABLE)
    message = str(info.value)
    assert "no registered name of the Mistral family" in message
    assert "registered families: DeepSeek, GLM, Llama, Qwen, QwQ, SmolLM" in message
    assert "--model_type default quantizes any decoder-only model" in message
    assert "SmolLM2" not in message.split("families:")[0]  # no hint from an unrelated family


def test_glm_5_1_is_never_hinted_as_smollm():
    without_glm = {n: e for n, e in TABLE.items() if not n.startswith("GLM")}
    with pytest.raises(ConfigError) as info:
        registry.lookup("GLM-5.1", without_glm)
    assert "closest" not in str(info.value) and "no registered name of the GLM family" in str(info.value)
    with pytest.raises(ConfigError, match=r"closest: GLM-4\.5 \(the GLM family\)"):
        registry.lookup("GLM-5.1", TABLE)


def test_a_typo_is_answered_with_its_family_and_the_names_serving_config_json(tiny_qwen2):
    with pytest.raises(ConfigError) as info:
        resolve("Qwen2.5-7B-Instruc", tiny_qwen2)
    message = str(info.value)
    assert message.startswith("unknown --model_type 'Qwen2.5-7B-Instruc'; closest: Qwen2.5-7B-Instruct")
    served = len(registry.hf_families()["qwen2"])
    assert "config.json's model_type 'qwen2' is served by: Qwen2.5-7B-Instruct, " in message
    assert f"({served} in all); pass one of them" in message and "--model_type default" in message


def test_a_wrong_case_name_hints_the_right_spelling():
    with pytest.raises(ConfigError, match="closest: Qwen2.5-7B-Instruct.*names are case-sensitive"):
        registry.lookup("qwen2.5-7b-instruct")


# ---- the docs table --------------------------------------------------------------------------------------------
DOCS = REPO / "docs" / "models.md"


def test_the_docs_table_is_the_registry():
    section = registry.docs_section(DOCS.read_text(encoding="utf-8"))
    assert section is not None, f"{DOCS} lacks the generated section; run: {registry.REGENERATE_DOCS}"
    assert section == registry.markdown_tables(), (
        f"{DOCS} does not match msmodelslim/model/adapters.ini (a name was added, renamed or removed); "
        f"regenerate it: {registry.REGENERATE_DOCS}")
    for name in registry.registered_adapters(include_entry_points=False):
        assert f"| `{name}` |" in section


def test_the_docs_can_be_regenerated(tmp_path, capsys):
    copy = tmp_path / "models.md"
    copy.write_text(f"# Models\n\n{registry.DOCS_BEGIN}\nstale\n{registry.DOCS_END}\n\nafter\n")
    assert registry.main(["--markdown", str(copy)]) == 0
    capsys.readouterr()
    text = copy.read_text()
    assert registry.docs_section(text) == registry.markdown_tables() and text.endswith("\n\nafter\n")
    assert registry.main(["--markdown"]) == 0 and capsys.readouterr().out.startswith("| `--model_type` |")
