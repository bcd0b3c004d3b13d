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
from msmodelslim.format.staging import MARKER, RESUME_STATE

PYTHON = [sys.executable, "-m", "msmodelslim"]
BLOCKS = 4
STATIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}
PIPELINES = {
    "iter_smooth+w8a8_static": [{"type": "iter_smooth", "alpha": 0.9}, STATIC],
    "quarot+w8a8_static": [{"type": "quarot"}, STATIC],
}


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
                 save: str = "ascendv1_saver", part_file_size: float = 4, runner: str = "layer_wise") -> Path:
    spec = {"runner": runner, "dataset": dataset, "process": process,
            "save": [{"type": save, "part_file_size": part_file_size}]}
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
