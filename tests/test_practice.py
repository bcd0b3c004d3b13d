"""The best-practice library: every registered model x every available quant_type runs; no match asks."""
from importlib.metadata import EntryPoint

import pytest

from msmodelslim.app import practice
from msmodelslim.app.practice import (KNOWN_QUANT_TYPES, LAB_PRACTICE, PracticeNeedsConsent, load_practice_file,
                                      practice_table, select_practice)
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.model import registry

FAMILY_OF_PEDIGREE = {"llama": "llama", "qwen2": "qwen2", "qwen2_5": "qwen2", "qwq": "qwen2", "qwen3": "qwen3",
                     "qwen1_5": "qwen2", "deepseek-r1-distill": "qwen2",
                     "qwen3_moe": "qwen3_moe", "deepseek_v3": "deepseek_v3", "glm4_moe": "glm4_moe",
                     "glm4_moe_lite": "glm4_moe_lite", "glm_5": "glm_moe_dsa", "deepseek_v3_2": "deepseek_v32",
                     "kimi_k2": "kimi_k2", "minimax_m2": "minimax_m2", "qwen3_next": "qwen3_next",
                     "longcat_flash": "longcat_flash", "step_3_5_flash": "step3p5", "deepseek_v4": "deepseek_v4"}
# Vision-language pedigrees: tiny checkpoints of tests/tiny_vlm.py, and the scheme their w8a8 practice gives the
# first name of the pedigree (the established tool's recipes: static W8A8, or MXFP8 for Qwen2.5-VL)
VLM_PEDIGREES = {"qwen2_5_vl": "W8A8_MXFP8", "qwen3_vl": "W8A8", "qwen3_vl_moe": "W8A8",
                 "qwen3_5_moe": "W8A8_DYNAMIC", "internvl3_5": "W8A8", "glm4_6v": "W8A8", "kimi_k2_5": "W8A8",
                 "qwen2_5_omni_thinker": "W8A8_DYNAMIC", "qwen3_omni_moe": "W8A8_DYNAMIC"}
# {pedigree: the tiny_vlm family its checkpoint is built as} where the two names differ
TINY_VLM = {"internvl3_5": "internvl", "glm4_6v": "glm4v_moe", "kimi_k2_5": "kimi_k25",
            "qwen2_5_omni_thinker": "qwen2_5_omni"}
FAMILY_OF_PEDIGREE.update({p: f"vlm:{TINY_VLM.get(p, p)}" for p in VLM_PEDIGREES})
# Adapters that refuse every checkpoint by name have no practices (none today).
REFUSED_PEDIGREES: set[str] = set()
TABLE = practice_table({name: entry.pedigree for name, entry in registry.registered_adapters().items()})
ALL_CASES = [(name, qt) for name, cells in TABLE for qt, cell in cells.items() if cell != "default (asks)"]
# Every name's lookup is in TABLE (built above, for every registered name). A practice serves every name of its
# pedigree alike (model_types "*"), so the end-to-end run takes the first name of each pedigree per quant_type:
# about a minute each for c8 here, and 60 names x 7 quant types would not fit in CI.
CASES = [(n, qt) for i, (n, qt) in enumerate(ALL_CASES) if registry.lookup(n).pedigree not in REFUSED_PEDIGREES and
         not any(qt == q and registry.lookup(m).pedigree == registry.lookup(n).pedigree for m, q in ALL_CASES[:i])]


def test_every_registered_family_has_practices():
    pedigrees = {e.pedigree for e in registry.registered_adapters().values()} - REFUSED_PEDIGREES
    assert pedigrees <= {p.name for p in LAB_PRACTICE.iterdir() if p.is_dir()}
    assert len(ALL_CASES) >= 2 * len(TABLE)


class _LazyModels(dict):
    def __init__(self, made: dict, factory) -> None:
        super().__init__(made)
        self.factory = factory

    def __missing__(self, family: str):
        from tiny_models import make_tiny_model
        from tiny_vlm import make_tiny_vlm

        vlm = family.removeprefix("vlm:")
        self[family] = (make_tiny_vlm(self.factory.mktemp(vlm), vlm) if vlm != family else
                        make_tiny_model(self.factory.mktemp(family), family))
        return self[family]


@pytest.fixture(scope="module")
def family_models(tiny_llama, tiny_qwen2, tiny_qwen3_bf16_tied, tiny_qwen3_moe, tiny_deepseek_v3, tmp_path_factory):
    return _LazyModels({"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3_bf16_tied,
                        "qwen3_moe": tiny_qwen3_moe, "deepseek_v3": tiny_deepseek_v3}, tmp_path_factory)


@pytest.mark.parametrize("model_type,quant_type", CASES)
def test_quant_type_alone_quantizes(family_models, tmp_path, model_type, quant_type):
    pedigree = registry.lookup(model_type).pedigree
    source = family_models[FAMILY_OF_PEDIGREE[pedigree]]
    report = quantize(QuantizeRequest(model_path=source, save_path=tmp_path / "out", model_type=model_type,
                                      device=DeviceSpec("cpu"), quant_type=quant_type))
    expected = {"w8a8": "W8A8_DYNAMIC", "w8a16": "W8A16", "w4a8": "W4A8_DYNAMIC", "w8a8s": "W8A8S",
                "w16a16s": "W16A16S", "w8a8c8": "W8A8_DYNAMIC", "w4a8c8": "W4A8_DYNAMIC",
                "w4a4": "W4A4_DYNAMIC"}[quant_type]
    if pedigree in VLM_PEDIGREES:  # --quant_type on a VLM resolves to its multimodal_vlm_modelslim_v1 practice
        expected = VLM_PEDIGREES[pedigree]
        saved = (tmp_path / "out" / f"{model_type}_best_practice.yaml").read_text()
        assert "apiversion: multimodal_vlm_modelslim_v1" in saved
    assert expected in report.plan.values()
    # c8 exactly when the label says kv_cache (protocol.md 3.1): the int8 KV cache is written
    assert (report.description.get("kv_cache_type") == "C8") == quant_type.endswith("c8")
    assert (tmp_path / "out" / f"{model_type}_best_practice.yaml").exists()


@pytest.fixture
def third_party_model(monkeypatch):
    ep = EntryPoint(name="Acme-7B", value="msmodelslim.model.families:LlamaAdapter", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    return "Acme-7B"


def test_no_practice_without_terminal_names_the_flag(third_party_model):
    with pytest.raises(PracticeNeedsConsent, match="--allow_default_practice"):
        select_practice(third_party_model, "acme-7b", "w8a8", is_interactive=lambda: False)


def test_no_practice_asks_on_a_terminal(third_party_model):
    questions = []
    chosen = select_practice(third_party_model, "acme-7b", "w8a8", is_interactive=lambda: True,
                             ask=lambda q: questions.append(q) or True)
    assert chosen.metadata.config_id == "default-w8a8" and "Use it?" in questions[0]
    with pytest.raises(PracticeNeedsConsent, match="declined"):
        select_practice(third_party_model, "acme-7b", "w8a8", is_interactive=lambda: True, ask=lambda q: False)
    assert select_practice(third_party_model, "acme-7b", "w8a16", allow_default=True).metadata.config_id == "default-w8a16"


def test_cli_refusal_exit_code_and_flag(third_party_model, tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    argv = ["quant", "--model_path", str(tiny_llama), "--save_path", str(tmp_path / "o"), "--device", "cpu",
            "--model_type", third_party_model, "--quant_type", "w8a8"]
    assert main(argv) == 5
    assert "--allow_default_practice" in capsys.readouterr().err
    assert main(argv + ["--allow_default_practice"]) == 0
    assert (tmp_path / "o" / "quant_model_description.json").exists()


def test_unavailable_quant_type_is_refused_by_name():
    with pytest.raises(UnsupportedError, match="w4a4 has no practice yet.*adapt_rotation"):
        select_practice("Qwen3-8B", "qwen3", "w4a4")
    with pytest.raises(ConfigError, match="known:"):
        select_practice("Qwen3-8B", "qwen3", "w9a9")


def test_custom_repository_wins_with_a_higher_score(tmp_path, monkeypatch):
    source = (LAB_PRACTICE / "qwen3" / "qwen3-w8a16.yaml").read_text()
    custom = tmp_path / "qwen3"
    custom.mkdir()
    (custom / "my-w8a16.yaml").write_text(source.replace("config_id: qwen3-w8a16", "config_id: my-w8a16")
                                          .replace("score: 90", "score: 95"))
    monkeypatch.setenv(practice.CUSTOM_REPO_ENV, str(tmp_path))
    assert select_practice("Qwen3-8B", "qwen3", "w8a16").metadata.config_id == "my-w8a16"


def test_practice_metadata_is_checked(tmp_path):
    source = (LAB_PRACTICE / "qwen3" / "qwen3-w8a16.yaml").read_text()
    renamed = tmp_path / "other.yaml"
    renamed.write_text(source)
    with pytest.raises(ConfigError, match="must equal the file name"):
        load_practice_file(renamed)
    broken = tmp_path / "qwen3-w8a16.yaml"
    broken.write_text(source.replace("label: {w_bit: 8, a_bit: 16}", "label: {w_bits: 8}"))
    with pytest.raises(ConfigError, match="invalid practice metadata"):
        load_practice_file(broken)


def test_every_shipped_practice_is_valid():
    for path in LAB_PRACTICE.glob("*/*.yaml"):
        load_practice_file(path)


def test_practices_command_lists_the_table(capsys):
    assert main(["practices"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "llama-w8a8" in out and "not available yet" in out
    assert set(KNOWN_QUANT_TYPES) >= {"w8a8", "w8a16"}


def test_w4a16_default_practice_runs_gptq_end_to_end(tiny_llama, tmp_path):
    from msmodelslim.cli.__main__ import main

    out = tmp_path / "o"
    argv = ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cpu",
            "--model_type", "Llama-2-7B", "--quant_type", "w4a16", "--allow_default_practice"]
    assert main(argv) == 0
    description = (out / "quant_model_description.json").read_text()
    assert '"model.layers.0.mlp.down_proj.weight_packed": "W4A16"' in description
    assert '"group_size": 64' in description
