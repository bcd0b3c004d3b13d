"""The calibration sets shipped under the file names that upstream best-practice recipes name as `dataset`.

Each name resolves (by the project's own dataset resolution) to a set written for msmodelslim in
`msmodelslim/lab_calib/`, reads to non-empty texts, keeps the keys of upstream's file, and is documented.
"""
import json

import pytest
import yaml

from msmodelslim.core.config import load_config, parse_config
from msmodelslim.core.dataset import LAB_CALIB, builtin_datasets, load_texts, read_texts, resolve_dataset

# name -> fewest samples it must read to (the two tiny upstream files are small by design)
UPSTREAM_SETS = {
    "boolq.jsonl": 40,
    "cn_en.jsonl": 40,
    "teacher_qualification.jsonl": 30,
    "calib_prompt.jsonl": 40,
    "humaneval_x.jsonl": 20,
    "autocodebench.jsonl": 30,
    "long_calib.jsonl": 20,
    "laos_calib.jsonl": 30,
    "qwen3_cot.json": 16,
    "qwen3_cot_w4a4.json": 30,
    "data_list_1.jsonl": 20,
    "data_list_2.jsonl": 30,
    "qwen2.5_w8a8_pdmix_calib_prompt.jsonl": 30,
    "qwen2.5_w8a8_pdmix_anti_prompt.jsonl": 20,
    "anti_prompt.json": 10,
    "test.json": 1,
}
MCQ_SETS = ("cn_en.jsonl", "teacher_qualification.jsonl")


def _rows(name):
    return [json.loads(line) for line in (LAB_CALIB / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _has_chinese(text):
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@pytest.mark.parametrize("name,minimum", sorted(UPSTREAM_SETS.items()))
def test_upstream_name_resolves_to_a_shipped_set_with_distinct_texts(name, minimum, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of that name in the working directory: the shipped file is found
    path = resolve_dataset(name, config_dir=tmp_path)
    assert path == LAB_CALIB / name
    assert name in builtin_datasets()
    texts = load_texts(name, config_dir=tmp_path)
    assert len(texts) >= minimum
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert len(set(texts)) == len(texts), "duplicate samples"
    assert texts == read_texts(path)


def test_every_sample_of_every_upstream_jsonl_has_a_text_field():
    for name in UPSTREAM_SETS:
        if name.endswith(".jsonl"):
            for row in _rows(name):
                field = "inputs_pretokenized" if "inputs_pretokenized" in row else "text"
                assert isinstance(row.get(field), str) and row[field].strip(), (name, row)


def test_sizes_are_bounded():
    total = sum(p.stat().st_size for p in LAB_CALIB.iterdir() if p.is_file())
    assert total < 2 * 1024 * 1024, f"lab_calib holds {total} bytes"
    assert (LAB_CALIB / "long_calib.jsonl").stat().st_size < 600 * 1024
    for name in UPSTREAM_SETS:
        assert (LAB_CALIB / name).stat().st_size < 300 * 1024 or name == "long_calib.jsonl"


def test_ids_are_consecutive_from_zero():
    for name in UPSTREAM_SETS:
        if name.endswith(".jsonl") and name != "humaneval_x.jsonl":
            assert [r["id"] for r in _rows(name)] == list(range(len(_rows(name)))), name


def test_boolq_passages_end_in_a_yes_no_question():
    for row in _rows("boolq.jsonl"):
        text = row["inputs_pretokenized"]
        assert "\nQuestion: " in text and text.endswith("?\nAnswer:")
        assert len(text.split("\nQuestion: ")[0].split(". ")) >= 3, "a passage of several sentences"


@pytest.mark.parametrize("name", MCQ_SETS)
def test_multiple_choice_sets_keep_upstream_keys_and_a_consistent_answer(name):
    for row in _rows(name):
        assert set(row) == {"id", "inputs_pretokenized", "choices_pretokenized", "label", "targets_pretokenized"}
        choices, label = row["choices_pretokenized"], row["label"]
        assert isinstance(choices, list) and len(choices) == 4
        assert isinstance(label, int) and 0 <= label < len(choices)
        assert row["targets_pretokenized"] == [choices[label].strip()]
        for letter in "ABCD":
            assert f"\n{letter}. " in row["inputs_pretokenized"]


def test_language_mix_of_the_multiple_choice_sets():
    cn_en = [r["inputs_pretokenized"] for r in _rows("cn_en.jsonl")]
    chinese = sum(_has_chinese(t) for t in cn_en)
    assert chinese >= 10 and len(cn_en) - chinese >= 5, "both Chinese and English-only items"
    assert sum(_has_chinese(t) and sum(c.isascii() and c.isalpha() for c in t) > 20 for t in cn_en) >= 5, "mixed items"
    teacher = [r["inputs_pretokenized"] for r in _rows("teacher_qualification.jsonl")]
    assert sum(_has_chinese(t) for t in teacher) > len(teacher) * 0.8, "mostly Chinese"


def test_humaneval_x_keeps_upstream_keys_and_calibrates_on_code():
    rows = _rows("humaneval_x.jsonl")
    languages = {r["task_id"].split("/")[0] for r in rows}
    assert languages == {"Python", "CPP", "Java", "Go", "JavaScript"}
    assert len({r["task_id"] for r in rows}) == len(rows)
    for r in rows:
        assert {"task_id", "prompt", "declaration", "canonical_solution", "test", "text"} <= set(r)
        assert r["text"] == r["prompt"] + r["canonical_solution"]
        assert "inputs_pretokenized" not in r  # the reader falls back to `text`: prompt plus solution
    assert read_texts(LAB_CALIB / "humaneval_x.jsonl") == [r["text"] for r in rows]


def test_humaneval_x_python_tasks_pass_their_own_tests():
    for r in _rows("humaneval_x.jsonl"):
        if r["task_id"].startswith("Python/"):
            exec(compile(r["prompt"] + r["canonical_solution"] + r["test"], r["task_id"], "exec"), {})


def test_autocodebench_rows_hold_statement_and_solution():
    rows = _rows("autocodebench.jsonl")
    assert len({r["language"] for r in rows}) >= 10
    assert {r["difficulty"] for r in rows} == {"easy", "medium", "hard"}
    for r in rows:
        assert r["inputs_pretokenized"].startswith("Problem (") and "\nSolution:\n```" in r["inputs_pretokenized"]
        assert r["canonical_solution"] in r["inputs_pretokenized"]


def test_long_calib_samples_are_long():
    rows = _rows("long_calib.jsonl")
    for r in rows:
        assert isinstance(r["token_count"], int) and r["token_count"] >= 1500
        assert len(r["inputs_pretokenized"]) >= 1200  # Chinese text packs many tokens into few characters
    assert sum(_has_chinese(r["inputs_pretokenized"]) for r in rows) >= 3
    assert sum("```" in r["inputs_pretokenized"] for r in rows) >= 3, "code and data listings too"


def test_laos_calib_mixes_kinds():
    kinds = [r["category"] for r in _rows("laos_calib.jsonl")]
    assert set(kinds) == {"reasoning", "math", "code", "prose"}
    assert min(kinds.count(k) for k in set(kinds)) >= 5


@pytest.mark.parametrize("name", ["qwen3_cot.json", "qwen3_cot_w4a4.json"])
def test_chain_of_thought_sets_think_then_answer(name):
    items = json.loads((LAB_CALIB / name).read_text(encoding="utf-8"))
    assert isinstance(items, list) and all(isinstance(t, str) for t in items)
    for text in items:
        question, rest = text.split("\n<think>\n", 1)
        reasoning, answer = rest.split("\n</think>\n", 1)
        assert question.strip() and reasoning.strip() and answer.strip()


def test_pdmix_calibration_prompts_are_longer_than_the_anti_outlier_prompts():
    long_prompts = load_texts("qwen2.5_w8a8_pdmix_calib_prompt.jsonl")
    short_prompts = load_texts("qwen2.5_w8a8_pdmix_anti_prompt.jsonl")
    assert min(map(len, long_prompts)) > max(map(len, short_prompts))
    assert sum(map(len, long_prompts)) / len(long_prompts) > 1000


def test_readme_documents_every_upstream_set():
    readme = (LAB_CALIB / "README.md").read_text(encoding="utf-8")
    for name in UPSTREAM_SETS:
        assert f"| `{name}` |" in readme, name
    assert "no third-party text" in readme


def test_every_shipped_data_file_is_documented_and_readable():
    readme = (LAB_CALIB / "README.md").read_text(encoding="utf-8")
    for name in builtin_datasets():
        assert f"`{name}`" in readme, name
        assert read_texts(LAB_CALIB / name)


RECIPE = """\
apiversion: modelslim_v1
metadata:
  config_id: qwen2-7b-w8a8-boolq
  label: {w_bit: 8, a_bit: 8}
spec:
  process:
    - type: linear_quant
      qconfig:
        act: {dtype: int8, scope: per_token, symmetric: true, method: minmax}
        weight: {dtype: int8, scope: per_channel, symmetric: true, method: minmax}
      include: ["*"]
      exclude: ["lm_head"]
  dataset: boolq.jsonl
"""


def test_recipe_naming_boolq_validates_and_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(yaml.safe_load(RECIPE), "recipe.yaml")
    assert config.spec.dataset == "boolq.jsonl"
    texts = load_texts(config.spec.dataset)
    assert len(texts) >= 40 and all(t.endswith("Answer:") for t in texts)

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    loaded = load_config(tmp_path / "recipe.yaml")
    assert resolve_dataset(loaded.spec.dataset, loaded.source_dir) == LAB_CALIB / "boolq.jsonl"
    assert load_texts(loaded.spec.dataset, loaded.source_dir) == texts


def test_a_file_next_to_the_recipe_still_wins_over_the_shipped_set(tmp_path):
    (tmp_path / "boolq.jsonl").write_text('{"id": 0, "inputs_pretokenized": "my own passage"}\n')
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    loaded = load_config(tmp_path / "recipe.yaml")
    assert load_texts(loaded.spec.dataset, loaded.source_dir) == ["my own passage"]
