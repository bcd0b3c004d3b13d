"""Several outputs from one run (issue #23, item 6): `spec.save` with one ascendv1_saver and one compressed_tensors
writes both formats from one calibration, each in its own subfolder, each byte for byte what the single-format run
writes; a scheme or step that one of the formats cannot hold is refused before any weight is read, naming it."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.resume import INTERVAL_ENV
from msmodelslim.format.staging import MARKER, RESUME_STATE
from tiny_models import make_tiny_model

BOTH = [{"type": "ascendv1_saver", "part_file_size": 4}, {"type": "compressed_tensors", "part_file_size": 4}]
FOLDER = {"ascendv1_saver": "ascendv1", "compressed_tensors": "compressed_tensors"}


def write_config(path: Path, dataset: str, process: list[dict], save: list[dict], runner: str = "layer_wise") -> Path:
    spec = {"runner": runner, "dataset": dataset, "process": process, "save": save}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out` but the completion marker (it records the writing process's pid and time)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != MARKER}


def linear_quant(scheme: str) -> list[dict]:
    return [{"type": "linear_quant", "qconfig": SCHEMES[scheme], "exclude": ["lm_head"]}]


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w8a8_static"])
def test_both_folders_equal_the_single_format_runs_byte_for_byte(tiny_llama, tmp_path, scheme):
    calib = small_calib(tmp_path)
    process = linear_quant(scheme)
    both = tmp_path / "both"
    report = run_quant(tiny_llama, both, write_config(tmp_path / "both.yaml", calib, process, BOTH))
    assert sorted(p.name for p in both.iterdir()) == sorted([MARKER, "ascendv1", "compressed_tensors"])
    assert "(ascendv1_saver)" in report.description["model_quant_type"]
    for save in BOTH:
        single = tmp_path / save["type"]
        run_quant(tiny_llama, single, write_config(tmp_path / f"{save['type']}.yaml", calib, process, [save]))
        expected, written = files(single), files(both / FOLDER[save["type"]])
        assert any(name.endswith(".safetensors") for name in expected)
        assert written.keys() == expected.keys()
        for name in expected:  # one by one: a failure names the file
            assert written[name] == expected[name], f"{FOLDER[save['type']]}/{name} differs from the single run's"


def test_each_folder_records_the_config_that_writes_it(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant("w8a16"), BOTH))
    for save in BOTH:
        practice = yaml.safe_load((out / FOLDER[save["type"]] / "Llama-2-7B_best_practice.yaml").read_text())
        assert [s["type"] for s in practice["spec"]["save"]] == [save["type"]]


def test_check_reads_both_folders(tiny_llama, tmp_path):
    from msmodelslim.app.check import check_checkpoint

    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant("w8a16"), BOTH))
    _, findings = check_checkpoint(out, tiny_llama)
    assert [f for f in findings if f.level == "error"] == []
    (out / "compressed_tensors" / "model.safetensors").unlink()
    _, findings = check_checkpoint(out, tiny_llama)
    errors = [f.message for f in findings if f.level == "error"]
    assert errors and all(e.startswith("compressed_tensors/: ") for e in errors)


PD_MIX = {"act": {"dtype": "int8", "scope": "pd_mix", "symmetric": False, "method": "minmax"},
          "weight": SCHEMES["w8a8_static"]["weight"]}


C8 = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                           "method": "minmax"}}
KV_FP8 = {"type": "dynamic_cache", "qconfig": {"dtype": "fp8_e4m3", "scope": "per_tensor", "symmetric": True,
                                               "method": "minmax"}}


@pytest.mark.parametrize("process, refusal", [
    ([{"type": "linear_quant", "qconfig": PD_MIX, "exclude": ["lm_head"]}], "W8A8_MIX, which compressed_tensors"),
    ([{"type": "fa3_quant"}, *linear_quant("w8a8_static")], "fa3_quant cannot be saved as compressed_tensors"),
    ([C8, *linear_quant("w8a8_dynamic")], "dynamic_cache cannot be saved as compressed_tensors"),
    ([KV_FP8, *linear_quant("w8a8_dynamic")], "dynamic_cache cannot be saved as ascendv1_saver"),
])
def test_what_one_format_cannot_hold_is_refused_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch, process,
                                                                          refusal):
    from msmodelslim.model import transformers_model

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(transformers_model.TransformersModel, "load_weights", no_weights)
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), process, BOTH)
    with pytest.raises(UnsupportedError, match=refusal):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_two_savers_of_one_type_are_refused(tiny_llama, tmp_path):
    save = [BOTH[0], {"type": "ascendv1_saver", "part_file_size": 1}]
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant("w8a16"), save)
    with pytest.raises(ConfigError, match="2 savers of type ascendv1_saver"):
        run_quant(tiny_llama, tmp_path / "out", config)


def test_dry_run_names_both_folders(tiny_llama, tmp_path, caplog):
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant("w8a8_dynamic"), BOTH)
    with caplog.at_level("INFO", logger="msmodelslim"):
        run_quant(tiny_llama, tmp_path / "out", config, dry_run=True)
    assert str(tmp_path / "out" / "compressed_tensors") in caplog.text and not (tmp_path / "out").exists()


def test_dp_layer_wise_writes_both_formats_as_one_process_does(tiny_llama, tmp_path):
    """Rank 0 writes both formats; with iter_smooth then static min/max every merge is exact, so the bytes equal
    the layer_wise run's."""
    from msmodelslim.core.device import DeviceSpec

    calib = small_calib(tmp_path)
    process = [{"type": "iter_smooth", "alpha": 0.9}, *linear_quant("w8a8_static")]
    run_quant(tiny_llama, tmp_path / "one", write_config(tmp_path / "one.yaml", calib, process, BOTH))
    run_quant(tiny_llama, tmp_path / "dp", write_config(tmp_path / "dp.yaml", calib, process, BOTH, "dp_layer_wise"),
              device=DeviceSpec("cpu", (0, 1)))
    one, dp = files(tmp_path / "one"), files(tmp_path / "dp")
    practices = {n for n in one if n.endswith("_best_practice.yaml")}  # they name the runner
    assert len(practices) == 2 and {n for n in one if n not in practices} == {n for n in dp if n not in practices}
    for name in one:
        if name not in practices:
            assert one[name] == dp[name], name


# ---- resume: one checkpoint for both writers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A copy of msmodelslim for the runs to import: the resume fingerprint covers the source files, which may be
    edited meanwhile (as tests/test_resume.py does)."""
    root = tmp_path_factory.mktemp("code")
    shutil.copytree(Path(__file__).resolve().parents[1] / "msmodelslim", root / "msmodelslim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _quant(code: Path, model: Path, out: Path, config: Path, *extra: str, fault: str | None = None
           ) -> subprocess.CompletedProcess:
    # the named fault points need a checkpoint after each block (the default schedule may skip some)
    env = {**os.environ, "MSMODELSLIM_LOG_LEVEL": "info", "PYTHONPATH": str(code), INTERVAL_ENV: "0"}
    if fault:
        env["MSMODELSLIM_FAULT_AT"] = fault
    argv = ["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu", "--model_type",
            "Llama-2-7B", "--config_path", str(config), *extra]
    return subprocess.run([sys.executable, "-m", "msmodelslim", *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=code)


def assert_killed_run_resumes_to_identical_bytes(code: Path, tmp_path: Path, savers: list[dict], fault: str) -> None:
    """Killed at `fault`, then `--resume`: the output equals a fresh run's byte for byte, resume state removed."""
    model = make_tiny_model(tmp_path / "model", "llama", num_hidden_layers=4)
    small = [{**save, "part_file_size": 0.00003} for save in savers]  # several shards: cut back and renamed back
    config = write_config(tmp_path / "c.yaml", small_calib(tmp_path), linear_quant("w8a8_static"), small)
    fresh = _quant(code, model, tmp_path / "fresh", config)
    assert fresh.returncode == 0, fresh.stderr
    out = tmp_path / "out"
    assert _quant(code, model, out, config, fault=fault).returncode == -signal.SIGKILL
    assert not out.exists()
    resumed = _quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed run: computed" in resumed.stderr
    expected = files(tmp_path / "fresh")
    assert sum(name.endswith(".safetensors") for name in expected) > 3 * len(savers)
    assert files(out) == expected
    assert not any(out.rglob(RESUME_STATE.parent.name))


@pytest.mark.parametrize("fault", ["block:2", "description"])
def test_killed_two_format_run_resumes_to_identical_bytes(code, tmp_path, fault):
    assert_killed_run_resumes_to_identical_bytes(code, tmp_path, BOTH, fault)
