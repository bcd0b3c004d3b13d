import json

import pytest

from msmodelslim.core.dataset import LAB_CALIB, load_texts, read_texts
from msmodelslim.core.errors import InvalidDatasetError


def test_builtin_mix_calib_is_varied_and_large_enough():
    texts = load_texts("mix_calib.jsonl")
    assert len(texts) >= 64
    assert any("\u4e00" <= ch <= "\u9fff" for t in texts for ch in t), "needs Chinese samples"
    assert any("def " in t or "fn " in t for t in texts), "needs code samples"
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", ["mix_calib.jsonl", "code_calib.jsonl", "chat_calib.jsonl"])
def test_every_shipped_set_has_at_least_64_distinct_samples(name):
    texts = load_texts(name)
    assert len(texts) >= 64 and len(set(texts)) == len(texts)
    assert name.split(".")[0] in (LAB_CALIB / "README.md").read_text()


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"inputs_pretokenized": "two", "id": 1}\n')
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "c.txt").write_text("para one\nstill one\n\npara two\n")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "b.json") == ["x", "y"]
    assert read_texts(tmp_path / "c.txt") == ["para one\nstill one", "para two"]


def test_relative_to_config_dir(tmp_path):
    (tmp_path / "mine.json").write_text('["hello"]')
    assert load_texts("mine.json", config_dir=tmp_path) == ["hello"]


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n', "nofield.jsonl:2: needs a string field"),
    ("list.json", '{"a": 1}', "must be a list of strings"),
    ("data.csv", "a,b", "unsupported dataset type .csv"),
    ("empty.txt", "\n\n", "contains no text samples"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InvalidDatasetError, match=message.replace(".", r"\.")):
        read_texts(tmp_path / name)


def test_missing_dataset_lists_builtin_names():
    with pytest.raises(InvalidDatasetError, match="mix_calib.jsonl"):
        load_texts("no_such_set.jsonl")
    assert (LAB_CALIB / "README.md").is_file()
