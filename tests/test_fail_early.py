"""Fail before the long work: every argument of quant, eval, convert and check (paths, parents, disk space,
datasets, the model type) is judged before any model is loaded or any weight read, and a dry run applies
exactly the real run's checks while changing nothing."""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import SCHEMES, run_quant, write_config
from msmodelslim.cli.__main__ import main
from msmodelslim.core.dataset import load_texts
from msmodelslim.core.errors import ConfigError, InvalidDatasetError, InvalidModelError

Usage = namedtuple("Usage", "total used free")

def _supported() -> str:
    """config.json model_types the registered adapters serve (grows as families are added)."""
    from msmodelslim.model.registry import hf_families

    return ", ".join(sorted(hf_families()))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def quant_args(model: Path, out: Path, config: Path, *extra) -> list:
    """Without --model_type: inferred from config.json."""
    return ["quant", "--model_path", model, "--save_path", out, "--device", "cpu", "--config_path", config, *extra]


def llama_args(model: Path, out: Path, config: Path, *extra) -> list:
    return quant_args(model, out, config, "--model_type", "Llama-2-7B", *extra)


def never(what: str):
    """A stand-in for the expensive step a check must come before."""
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{what} was called")
    return fail


@pytest.fixture
def w8a16(tmp_path) -> Path:
    return write_config(tmp_path / "w8a16.yaml", SCHEMES["w8a16"])


@pytest.fixture
def no_weight_reads(monkeypatch) -> None:
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never("a weight read"))


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("fail_early")
    return run_quant(tiny_llama, work / "q", write_config(work / "c.yaml", SCHEMES["w8a16"])).save_path


def tiny_disk(monkeypatch, free: int) -> list[Path]:
    """shutil.disk_usage reports `free` bytes; returns the directories it was asked about."""
    asked: list[Path] = []

    def usage(path):
        asked.append(Path(path))
        return Usage(10 * free + 1, 9 * free + 1, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


# ---- 1. quant: a dry run applies the real run's checks -----------------------------------------------------
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_missing_parent_of_save_path_is_refused_in_dry_and_real_runs(tiny_llama, tmp_path, capsys, w8a16,
                                                                       no_weight_reads, dry_run):
    out = tmp_path / "missing" / "out"
    code, _, err = run_cli(capsys, *llama_args(tiny_llama, out, w8a16, *(["--dry_run"] if dry_run else [])))
    assert code == 2 and "parent directory of --save_path" in err and str(tmp_path / "missing") in err, err
    assert not (tmp_path / "missing").exists()


def test_a_dry_run_refuses_a_non_empty_save_path_like_the_real_run(tiny_llama, tmp_path, capsys, w8a16):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, *llama_args(tiny_llama, out, w8a16, "--dry_run"))
    assert code == 3 and "is not empty" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_dry_run_recovers_nothing_but_says_what_the_real_run_will(tiny_llama, tmp_path, capsys, w8a16):
    # a killed --overwrite left the previous checkpoint set aside; only a real run (or check) may move it back
    aside = tmp_path / ".out.old-0123abcd"
    aside.mkdir()
    (aside / "quant_model_description.json").write_text("{}")
    code, _, err = run_cli(capsys, *llama_args(tiny_llama, tmp_path / "out", w8a16, "--dry_run"))
    assert code == 0, err
    assert aside.is_dir() and not (tmp_path / "out").exists()
    assert "interrupted earlier run left" in err and str(aside) in err


# ---- 1. quant and convert: free disk space ---------------------------------------------------------------
def estimate_output_bytes(source: Path) -> int:
    from msmodelslim.format.disk_space import estimate_output_bytes

    return estimate_output_bytes(source)


def test_the_output_estimate_is_the_input_weights_plus_copied_side_files(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"w" * 500)
    (tmp_path / "config.json").write_text("{}")  # 2 bytes, copied into every output
    (tmp_path / "pytorch_model.bin").write_bytes(b"b" * 10_000)  # never read, never written
    (tmp_path / "sub").mkdir()
    assert estimate_output_bytes(tmp_path) == 1502


def test_a_tiny_disk_is_refused_before_any_weight_is_read(tiny_llama, tmp_path, capsys, monkeypatch, w8a16,
                                                          no_weight_reads):
    asked = tiny_disk(monkeypatch, free=1000)
    for extra in ([], ["--dry_run"]):
        code, _, err = run_cli(capsys, *llama_args(tiny_llama, tmp_path / "out", w8a16, *extra))
        assert code == 6 and "not enough free space" in err, err
        needed = estimate_output_bytes(tiny_llama)  # under 1 MiB: given in bytes
        assert f"needs up to {needed} bytes" in err and f"{tmp_path} has 1000 bytes free" in err, err
    assert asked and all(p == tmp_path for p in asked)  # the disk that receives the staging directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a16.yaml"]


def test_overwrite_frees_nothing_before_the_swap(tiny_llama, quantized, tmp_path, capsys, monkeypatch, w8a16):
    out = tmp_path / "out"
    shutil.copytree(quantized, out)
    needed = estimate_output_bytes(tiny_llama)
    tiny_disk(monkeypatch, free=needed - 1)  # the old checkpoint's size does not count as free
    code, _, err = run_cli(capsys, *llama_args(tiny_llama, out, w8a16, "--overwrite", "--dry_run"))
    assert code == 6 and "previous checkpoint there is kept" in err, err
    tiny_disk(monkeypatch, free=needed)
    assert run_cli(capsys, *llama_args(tiny_llama, out, w8a16, "--overwrite", "--dry_run"))[0] == 0


def test_convert_refuses_a_tiny_disk_before_loading(quantized, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("msmodelslim.app.convert.load_ascendv1", never("loading the checkpoint"))
    tiny_disk(monkeypatch, free=10)
    code, _, err = run_cli(capsys, "convert", "--model_path", quantized, "--save_path", tmp_path / "ct")
    assert code == 6 and "not enough free space" in err and str(tmp_path) in err, err
    assert not (tmp_path / "ct").exists()


def test_convert_checks_the_shards_before_loading(quantized, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    for shard in broken.glob("*.safetensors"):
        shard.unlink()
    monkeypatch.setattr("msmodelslim.app.convert.load_ascendv1", never("loading the checkpoint"))
    code, _, err = run_cli(capsys, "convert", "--model_path", broken, "--save_path", tmp_path / "ct")
    assert code == 2 and "holds no *.safetensors files" in err, err


# ---- 1. eval: every argument before the float model --------------------------------------------------------
@pytest.fixture
def no_float_model(monkeypatch) -> None:
    monkeypatch.setattr("msmodelslim.app.evaluate.load_float_model", never("loading the float model"))


@pytest.fixture
def eval_text(tmp_path) -> str:
    path = tmp_path / "eval.txt"
    path.write_text("Debian packages are installed with apt and configured in /etc. " * 20)
    return str(path)


def eval_args(model: Path, quant: Path, dataset: str, *extra) -> list:
    return ["eval", "--model_path", model, "--quant_path", quant, "--dataset", dataset, "--window", "16",
            "--max_windows", "2", *extra]


def test_eval_refuses_a_bad_dataset_before_the_float_model(tiny_llama, quantized, capsys, no_float_model):
    code, _, err = run_cli(capsys, *eval_args(tiny_llama, quantized, "no_such_text.txt"))
    assert code == 2 and "not found" in err and "prose_eval.txt" in err, err


def test_eval_refuses_a_damaged_shard_before_the_float_model(tiny_llama, quantized, tmp_path, capsys, eval_text,
                                                             no_float_model):
    broken = tmp_path / "q"
    shutil.copytree(quantized, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: its header no longer parses
    code, _, err = run_cli(capsys, *eval_args(tiny_llama, broken, eval_text))
    assert code == 2 and "not a readable safetensors file" in err, err


def test_eval_refuses_a_checkpoint_of_another_model_before_the_float_model(tiny_qwen3_bf16_tied, quantized,
                                                                           capsys, eval_text, no_float_model):
    code, _, err = run_cli(capsys, *eval_args(tiny_qwen3_bf16_tied, quantized, eval_text))
    assert code == 2 and "was not quantized from --model_path" in err and "model_type" in err, err


def test_eval_api_checks_the_window_before_the_float_model(tiny_llama, quantized, eval_text, no_float_model):
    import torch

    from msmodelslim.app.evaluate import evaluate

    with pytest.raises(ConfigError, match="--window must be >= 2"):  # the CLI checked it; api callers did not
        evaluate(tiny_llama, quantized, eval_text, torch.device("cpu"), window=1)


def test_eval_refuses_a_bad_device_before_the_float_model(tiny_llama, quantized, capsys, eval_text, no_float_model):
    code, _, err = run_cli(capsys, *eval_args(tiny_llama, quantized, eval_text, "--device", "gpu7"))
    assert code == 2 and "--device 'gpu7' is not valid" in err


# ---- 1. check: a missing path is named ---------------------------------------------------------------------
def test_check_names_a_path_that_does_not_exist(tmp_path, capsys):
    code, _, err = run_cli(capsys, "check", tmp_path / "typo")
    assert code == 2 and f"{tmp_path / 'typo'} does not exist" in err, err
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "check", tmp_path / "file")
    assert code == 2 and "is not a directory" in err, err


# ---- 2. --model_type inferred from config.json -------------------------------------------------------------
@pytest.mark.parametrize("fixture,name", [("tiny_llama", "SmolLM2-135M"), ("tiny_qwen3_bf16_tied", "Qwen3-0.6B")])
def test_quant_infers_the_model_type_and_succeeds(request, tmp_path, capsys, w8a16, fixture, name):
    model = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quant_args(model, out, w8a16))
    assert code == 0, err
    assert f"--model_type not given: using {name} for config.json model_type" in err
    assert (out / f"{name}_best_practice.yaml").is_file()


@pytest.mark.parametrize("fixture,name", [("tiny_qwen3_moe", "Qwen3-30B-A3B"), ("tiny_deepseek_v3", "DeepSeek-V3")])
def test_moe_families_are_inferred_too(request, tmp_path, capsys, fixture, name):
    model = request.getfixturevalue(fixture)
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"])
    code, _, err = run_cli(capsys, *quant_args(model, tmp_path / "out", config, "--dry_run"))
    assert code == 0 and f"using {name}" in err, err


def test_the_inferred_model_type_selects_the_practice(tiny_qwen3_bf16_tied, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quant", "--model_path", tiny_qwen3_bf16_tied, "--save_path", tmp_path / "o",
                           "--device", "cpu", "--quant_type", "w8a16", "--dry_run")
    assert code == 0 and "using Qwen3-0.6B" in err, err


def model_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def infer_model_type(model_path: Path) -> str:
    from msmodelslim.model.registry import infer_model_type

    return infer_model_type(model_path)


def test_the_model_s_own_name_is_preferred(tmp_path):
    named = model_dir(tmp_path / "a", {"model_type": "qwen2", "_name_or_path": "Qwen/Qwen2.5-7B-Instruct"})
    assert infer_model_type(named) == "Qwen2.5-7B-Instruct"
    by_folder = model_dir(tmp_path / "Qwen2-7B-Instruct-sft", {"model_type": "qwen2"})
    assert infer_model_type(by_folder) == "Qwen2-7B-Instruct"  # the longest registered name the folder holds
    anonymous = model_dir(tmp_path / "b", {"model_type": "qwen2"})
    assert infer_model_type(anonymous) == "Qwen2-7B"  # the first of the family in adapters.ini


def test_an_unknown_family_is_refused_naming_the_supported_ones(tmp_path, capsys, w8a16):
    model = model_dir(tmp_path / "m", {"model_type": "mistral"})
    code, _, err = run_cli(capsys, *quant_args(model, tmp_path / "out", w8a16))
    assert code == 2 and "'mistral'" in err and f"supported: {_supported()}" in err and "pass --model_type" in err
    assert {"llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"} <= set(_supported().split(", "))
    assert "or --model_type default for the generic adapter (MistralForCausalLM" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [(None, "has no config.json"), ("{oops", "is not readable JSON"),
                                         ("[]", "is not a JSON object")])
def test_a_config_json_that_names_no_type_asks_for_model_type(tmp_path, text, needle):
    model = tmp_path / "m"
    model.mkdir()
    if text is not None:
        (model / "config.json").write_text(text)
    with pytest.raises(InvalidModelError, match=needle) as info:
        infer_model_type(model)
    assert "--model_type" in str(info.value)


# ---- 3. built-in evaluation sets -----------------------------------------------------------------------------
def test_eval_help_lists_the_builtin_sets(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "prose_eval.txt" in out and "mix_calib.jsonl" in out


def test_builtin_eval_text_resolves_by_name_but_never_calibrates():
    from msmodelslim.core.dataset import LAB_EVAL, resolve_eval_dataset

    assert resolve_eval_dataset("prose_eval.txt") == LAB_EVAL / "prose_eval.txt"
    assert resolve_eval_dataset("mix_calib.jsonl").is_file()
    with pytest.raises(InvalidDatasetError, match="not found"):
        load_texts("prose_eval.txt")  # evaluation text is never calibration data


def test_eval_runs_on_the_builtin_text(tiny_llama, quantized, capsys):
    code, out, err = run_cli(capsys, *eval_args(tiny_llama, quantized, "prose_eval.txt"))
    assert code == 0 and "windows: 2 x 16 tokens" in out, err
