"""quant --resume (issue #23): a killed layer_wise run continues from its last finished block; the output is
byte-identical to an uninterrupted run, no finished block is computed again, and a checkpoint made with another
config, model, data set or code is refused with the reason. Killed runs are real processes (python -m msmodelslim)
killed with SIGKILL, at named points (msmodelslim/core/faults.py) or at random moments."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import SCHEMES, small_calib
from tiny_models import make_tiny_model
from msmodelslim.core.resume import INTERVAL_ENV
from msmodelslim.format.staging import MARKER, RESUME_STATE

PYTHON = [sys.executable, "-m", "msmodelslim"]
BLOCKS = 4
STATIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}
PIPELINES = {
    "iter_smooth+w8a8_static": [{"type": "iter_smooth", "alpha": 0.9}, STATIC],
    "quarot+w8a8_static": [{"type": "quarot"}, STATIC],
}


@pytest.fixture(autouse=True)
def checkpoint_every_block(monkeypatch):
    """The named fault points need a checkpoint after each block; the default schedule ("auto") writes fewer where
    blocks are quick beside a checkpoint (tests of it: test_checkpoint_schedule.py, and the random kill below)."""
    monkeypatch.setenv(INTERVAL_ENV, "0")


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A copy of msmodelslim that the runs import: the fingerprint covers the source files, and a working tree
    edited meanwhile (by a person or a tool) must not make a resume of this test refuse."""
    root = tmp_path_factory.mktemp("code")
    shutil.copytree(Path(__file__).resolve().parents[1] / "msmodelslim", root / "msmodelslim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama4"), "llama", num_hidden_layers=BLOCKS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """One calibration file for every run: its path is part of the config the output records."""
    return small_calib(tmp_path_factory.mktemp("calib"))


def write_config(tmp_path: Path, dataset: str, process: list[dict], name: str = "config.yaml",
                 save: str = "ascendv1_saver", part_file_size: float = 4, runner: str = "layer_wise",
                 calibration: dict | None = None) -> Path:
    spec = {"runner": runner, "dataset": dataset, "process": process,
            "save": [{"type": save, "part_file_size": part_file_size}]}
    if calibration is not None:
        spec["calibration"] = calibration
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def quant(code: Path, model: Path, out: Path, config: Path, *extra: str, fault: str | None = None,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """A real process running the copy of msmodelslim in `code`, so that it can be killed."""
    env = {**os.environ, **(env or {}), "MSMODELSLIM_LOG_LEVEL": "info", "PYTHONPATH": str(code)}
    if fault:
        env["MSMODELSLIM_FAULT_AT"] = fault
    argv = ["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu", "--model_type",
            "Llama-2-7B", "--config_path", str(config), *extra]
    return subprocess.run(PYTHON + argv, capture_output=True, text=True, env=env, timeout=300, cwd=code)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the output but the marker (which records the writing process's pid and time)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != MARKER}


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def computed_blocks(log: str) -> int:
    """How many blocks the resumed process computed, from its closing log line."""
    found = re.search(r"resumed run: computed (\d+) of (\d+) blocks", log)
    assert found, log
    return int(found.group(1))


@pytest.fixture(scope="module")
def reference(code, model, dataset, tmp_path_factory) -> dict:
    """The uninterrupted output of each pipeline (and of the compressed-tensors save)."""
    outputs = {}
    for name, process in PIPELINES.items():
        tmp = tmp_path_factory.mktemp(name.replace("+", "_"))
        done = quant(code, model, tmp / "out", write_config(tmp, dataset, process))
        assert done.returncode == 0, done.stderr
        outputs[name] = snapshot(tmp / "out")
    return outputs


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("fault", ["checkpoint:0", "checkpoint:2", "block:1", "description"])
def test_killed_run_resumes_to_identical_bytes(code, model, dataset, reference, tmp_path, pipeline, fault):
    config, out = write_config(tmp_path, dataset, PIPELINES[pipeline]), tmp_path / "out"
    killed = quant(code, model, out, config, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and len(staging_dirs(out)) == 1
    assert (staging_dirs(out)[0] / RESUME_STATE).is_file()
    resumed = quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # finished before the kill: blocks 0..k (checkpoint:k), 0..k-1 (killed after writing block k, before its
    # checkpoint), all of them (killed while saving)
    finished = {"checkpoint:0": 1, "checkpoint:2": 3, "block:1": 1, "description": BLOCKS}[fault]
    assert computed_blocks(resumed.stderr) == BLOCKS - finished
    assert snapshot(out) == reference[pipeline]
    assert staging_dirs(out) == [] and not (out / ".resume").exists()


SAVES = {  # several small shards: closed shards, the open one cut back, the renames taken back
    "ascendv1 in 30 KB shards": ("ascendv1_saver", 0.00003),
    "compressed_tensors in 30 KB shards": ("compressed_tensors", 0.00003),
}


@pytest.mark.parametrize("save", list(SAVES))
@pytest.mark.parametrize("fault", ["block:2", "description"])
def test_resume_continues_the_shards_of_either_format(code, model, dataset, tmp_path, save, fault):
    saver, part = SAVES[save]
    config = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"], save=saver, part_file_size=part)
    fresh = quant(code, model, tmp_path / "fresh", config)
    assert fresh.returncode == 0, fresh.stderr
    expected = snapshot(tmp_path / "fresh")
    assert sum(name.endswith(".safetensors") for name in expected) > 3  # the case is what it says
    out = tmp_path / "out"
    assert quant(code, model, out, config, fault=fault).returncode == -signal.SIGKILL
    resumed = quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert computed_blocks(resumed.stderr) == (BLOCKS - 2 if fault == "block:2" else 0)
    assert snapshot(out) == expected


def _wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> bool:
    """True once `condition` holds; False when the process ended first."""
    deadline = time.time() + seconds
    while not condition():
        if process.poll() is not None:
            return False
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("seed,schedule", [(1, "0"), (2, "0"), (3, "auto")])
def test_sigkill_at_a_random_moment_then_resume_gives_identical_bytes(code, model, dataset, reference, tmp_path,
                                                                      monkeypatch, seed, schedule):
    """SIGKILL at a random moment after the first checkpoint: among the blocks, inside a checkpoint, or while
    saving (the tiny model's blocks take milliseconds; benchmarks/resume_smollm2.py does this on SmolLM2). With
    the default schedule the checkpoint after block 0 may be the only one before the kill."""
    monkeypatch.setenv(INTERVAL_ENV, schedule)
    config, out = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"]), tmp_path / "out"
    env = {**os.environ, "MSMODELSLIM_LOG_LEVEL": "warning", "PYTHONPATH": str(code)}
    argv = ["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu", "--model_type",
            "Llama-2-7B", "--config_path", str(config)]
    process = subprocess.Popen(PYTHON + argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=code)
    started = _wait_for(lambda: any((p / RESUME_STATE).is_file() for p in staging_dirs(out)), process)
    time.sleep(random.Random(seed).uniform(0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    if out.exists():  # it finished before the signal: nothing to resume, and nothing may be left behind
        assert staging_dirs(out) == []
    else:
        assert started and len(staging_dirs(out)) == 1
        # the kill may land after the finished run removed its checkpoint and before it renamed the output into
        # place: then nothing is left to resume, and the run must say so and start over
        checkpointed = (staging_dirs(out)[0] / RESUME_STATE).is_file()
        resumed = quant(code, model, out, config, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        if checkpointed:
            assert computed_blocks(resumed.stderr) < BLOCKS
        else:
            assert "left a checkpoint; starting from the first block" in resumed.stderr, resumed.stderr
    assert snapshot(out) == reference["iter_smooth+w8a8_static"]


# ---- what is refused, and what happens without --resume -------------------------------------------------------
def _killed_after_block_1(code: Path, model: Path, config: Path, out: Path) -> Path:
    assert quant(code, model, out, config, fault="checkpoint:1").returncode == -signal.SIGKILL
    [staging] = staging_dirs(out)
    return staging


def _refused(result: subprocess.CompletedProcess, staging: Path, before: dict) -> str:
    assert result.returncode == 2, result.stderr
    assert "--resume refused" in result.stderr and "rerun without --resume" in result.stderr
    assert snapshot(staging) == before  # nothing was changed
    return result.stderr


def test_a_changed_config_is_refused_with_the_reason(code, model, dataset, tmp_path):
    out = tmp_path / "out"
    staging = _killed_after_block_1(code, model, write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"]),
                                    out)
    before = snapshot(staging)
    changed = write_config(tmp_path, dataset, [{"type": "iter_smooth", "alpha": 0.8}, STATIC])
    refusal = _refused(quant(code, model, out, changed, "--resume"), staging, before)
    assert "differs from this one in the config" in refusal


def test_changed_calibration_data_is_refused_with_the_reason(code, model, tmp_path):
    out, data = tmp_path / "out", small_calib(tmp_path)
    config = write_config(tmp_path, data, PIPELINES["iter_smooth+w8a8_static"])
    staging = _killed_after_block_1(code, model, config, out)
    before = snapshot(staging)
    Path(data).write_text(Path(data).read_text().replace("Sample 3", "Example 3"))  # same path, other text
    refusal = _refused(quant(code, model, out, config, "--resume"), staging, before)
    assert "differs from this one in the calibration data" in refusal


def test_a_changed_model_is_refused_naming_the_file(code, model, dataset, tmp_path):
    copy, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(model, copy)
    config = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"])
    staging = _killed_after_block_1(code, copy, config, out)
    before = snapshot(staging)
    settings = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**settings, "rms_norm_eps": 1e-5}))
    refusal = _refused(quant(code, copy, out, config, "--resume"), staging, before)
    assert "differs from this one in the model files (config.json)" in refusal


def test_changed_code_is_refused_with_the_reason(code, model, dataset, tmp_path):
    edited, out = tmp_path / "code", tmp_path / "out"
    shutil.copytree(code, edited, ignore=shutil.ignore_patterns("__pycache__"))
    config = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"])
    staging = _killed_after_block_1(edited, model, config, out)
    before = snapshot(staging)
    runner = edited / "msmodelslim" / "core" / "runner.py"
    runner.write_text(runner.read_text() + "\n# edited\n")
    refusal = _refused(quant(edited, model, out, config, "--resume"), staging, before)
    assert "differs from this one in msmodelslim's code" in refusal


def test_a_run_without_resume_starts_over_and_says_resume_existed(code, model, dataset, reference, tmp_path):
    config, out = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"]), tmp_path / "out"
    staging = _killed_after_block_1(code, model, config, out)
    fresh = quant(code, model, out, config)
    assert fresh.returncode == 0, fresh.stderr
    assert f"removed {staging}" in fresh.stderr and "'quant --resume' would have continued" in fresh.stderr
    assert "resumed run" not in fresh.stderr
    assert snapshot(out) == reference["iter_smooth+w8a8_static"] and staging_dirs(out) == []


def test_resume_with_nothing_to_resume_starts_from_the_first_block(code, model, dataset, reference, tmp_path):
    config, out = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"]), tmp_path / "out"
    result = quant(code, model, out, config, "--resume")
    assert result.returncode == 0, result.stderr
    assert "no interrupted run" in result.stderr and "starting from the first block" in result.stderr
    assert snapshot(out) == reference["iter_smooth+w8a8_static"]


def test_resume_is_refused_for_dp_layer_wise_before_any_weight_is_read(code, model, dataset, tmp_path):
    config = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"], runner="dp_layer_wise")
    argv = ["quant", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--device", "cpu:0,1",
            "--model_type", "Llama-2-7B", "--config_path", str(config), "--resume"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    result = subprocess.run(PYTHON + argv, capture_output=True, text=True, env=env, timeout=300, cwd=code)
    assert result.returncode == 2 and "--resume works with spec.runner layer_wise and model_wise" in result.stderr
    assert not (tmp_path / "out").exists() and staging_dirs(tmp_path / "out") == []


def test_model_wise_resumes_too(code, model, dataset, reference, tmp_path):
    config = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"], runner="model_wise")
    out = tmp_path / "out"
    assert quant(code, model, out, config, fault="checkpoint:1").returncode == -signal.SIGKILL
    resumed = quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert computed_blocks(resumed.stderr) == BLOCKS - 2
    practice = "Llama-2-7B_best_practice.yaml"  # records the runner; the tensors equal layer_wise's
    assert {k: v for k, v in snapshot(out).items() if k != practice} == \
        {k: v for k, v in reference["iter_smooth+w8a8_static"].items() if k != practice}


def test_a_resumed_run_killed_again_resumes_again(code, model, dataset, reference, tmp_path):
    config, out = write_config(tmp_path, dataset, PIPELINES["iter_smooth+w8a8_static"]), tmp_path / "out"
    assert quant(code, model, out, config, fault="checkpoint:0").returncode == -signal.SIGKILL
    again = quant(code, model, out, config, "--resume", fault="checkpoint:2")
    assert again.returncode == -signal.SIGKILL, again.stderr
    assert len(staging_dirs(out)) == 1  # the same directory, continued
    resumed = quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert computed_blocks(resumed.stderr) == BLOCKS - 3
    assert snapshot(out) == reference["iter_smooth+w8a8_static"]


def test_gptaq_resumes_with_the_float_models_hidden_states(code, model, dataset, tmp_path):
    """GPTAQ carries a second stream (the float model's hidden states): the checkpoint keeps it, and the resumed
    run gives the uninterrupted run's bytes."""
    weight = {**SCHEMES["w4a16_g16"]["weight"], "method": "gptq"}
    weight["ext"] = {**weight.get("ext", {}), "gptaq_alpha": 0.25}
    process = [{"type": "linear_quant", "qconfig": {"weight": weight}, "exclude": ["lm_head"]}]
    config = write_config(tmp_path, dataset, process, calibration={"next_block_inputs": "quantized"})
    whole = quant(code, model, tmp_path / "whole", config)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    assert quant(code, model, out, config, fault="checkpoint:1").returncode == -signal.SIGKILL
    resumed = quant(code, model, out, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert computed_blocks(resumed.stderr) == BLOCKS - 2
    assert snapshot(out) == snapshot(tmp_path / "whole")
