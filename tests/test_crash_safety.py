"""Crash safety: a run killed at any phase leaves --save_path absent, the previous checkpoint or the complete new
one; the next run (or `msmodelslim check`) finishes or undoes an interrupted replacement and removes what the
killed run left. Processes are real (python -m msmodelslim) and are killed with SIGKILL at named points
(msmodelslim/core/faults.py), or sent SIGTERM."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import SCHEMES, mounted_tmpfs, small_calib
from msmodelslim.cli.__main__ import main
from msmodelslim.format.staging import MARKER, recover, write_marker

PYTHON = [sys.executable, "-m", "msmodelslim"]


def _config(tmp_path: Path, name: str = "static.yaml", runner: str = "layer_wise") -> Path:
    spec = {"runner": runner, "dataset": small_calib(tmp_path),
            "process": [{"type": "iter_smooth", "alpha": 0.9},
                        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def _quant_argv(model: Path, out: Path, config: Path, device: str, extra) -> list[str]:
    return ["quant", "--model_path", str(model), "--save_path", str(out), "--device", device,
            "--model_type", "Llama-2-7B", "--config_path", str(config), *extra]


def quant(model: Path, out: Path, config: Path, *extra: str, fault: str | None = None, device: str = "cpu",
          env: dict | None = None) -> subprocess.CompletedProcess:
    """A real process, so that it can be killed (the runs that are not killed go faster in-process: run_main)."""
    env = {**os.environ, **(env or {}), "MSMODELSLIM_LOG_LEVEL": "warning"}
    if fault:
        env["MSMODELSLIM_FAULT_AT"] = fault
    return subprocess.run(PYTHON + _quant_argv(model, out, config, device, extra), capture_output=True, text=True,
                          env=env, timeout=300)


def run_main(*argv: str) -> subprocess.CompletedProcess:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def quant_here(model: Path, out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_main(*_quant_argv(model, out, config, "cpu", extra))


def check(path: Path) -> subprocess.CompletedProcess:
    return run_main("check", str(path))


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def assert_whole(out: Path, previous: dict | None) -> str:
    """The allowed states; returns which one it is."""
    if not out.exists():
        return "absent"
    if previous is not None and snapshot(out) == previous:
        return "previous"
    result = check(out)
    assert result.returncode == 0, f"neither previous nor a complete checkpoint:\n{result.stdout}{result.stderr}"
    assert json.loads((out / MARKER).read_text())["complete"] is True
    return "new"


PHASES = ["loaded", "calibration", "block:0", "block:1", "description", "swap"]


@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_each_phase_of_an_overwrite_leaves_a_whole_checkpoint(tiny_llama, tmp_path, phase):
    config, out = _config(tmp_path), tmp_path / "out"
    assert quant_here(tiny_llama, out, config).returncode == 0
    previous = snapshot(out)
    killed = quant(tiny_llama, out, config, "--overwrite", fault=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = assert_whole(out, previous)
    # the next look at it (check, or any run) completes or undoes the interrupted replacement
    recovered = check(out)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert out.exists() and assert_whole(out, previous) in ("previous", "new")
    if phase == "swap":
        assert state == "absent" and "completed the interrupted replacement" in recovered.stdout
    assert quant_here(tiny_llama, out, config, "--overwrite").returncode == 0
    assert check(out).returncode == 0 and leftovers(out) == []


@pytest.mark.parametrize("phase", ["calibration", "block:1", "description"])
def test_kill_of_a_first_run_leaves_nothing_that_looks_complete(tiny_llama, tmp_path, phase):
    config, out = _config(tmp_path), tmp_path / "out"
    killed = quant(tiny_llama, out, config, fault=phase)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = [out.parent / name for name in leftovers(out)]
    assert len(stale) == 1  # the killed run's staging directory ...
    if phase == "description":  # ... which holds a description but never passes check
        assert (stale[0] / "quant_model_description.json").exists()
        result = check(stale[0])
        assert result.returncode == 4 and "not complete" in result.stdout
    rerun = quant_here(tiny_llama, out, config)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == [] and check(out).returncode == 0


def test_sigterm_is_handled_like_ctrl_c(tiny_llama, tmp_path):
    config, out = _config(tmp_path), tmp_path / "out"
    env = {**os.environ, "MSMODELSLIM_FAULT_AT": "block:0", "MSMODELSLIM_FAULT_ACTION": "hang"}
    argv = PYTHON + ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cpu",
                     "--model_type", "Llama-2-7B", "--config_path", str(config)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: any((p / "quant_model_weights-00001-of-00001.safetensors").exists() or
                          any(p.glob(".shard-*")) for p in tmp_path.glob(".out.partial-*")), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("msmodelslim:")] == [
        "msmodelslim: terminated (SIGTERM); partial output removed, --save_path left as it was"]
    assert not out.exists() and leftovers(out) == []


def _wait_for(condition, process, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _dp_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("msmodelslim-dp-*"))


def _ranks_of(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in result.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killing_the_multi_device_launcher_leaves_no_ranks_and_no_temp_folder(tiny_llama, tmp_path, how):
    config, out = _config(tmp_path, runner="dp_layer_wise"), tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "MSMODELSLIM_FAULT_AT": "block:0", "MSMODELSLIM_FAULT_ACTION": "hang"}
    argv = PYTHON + ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cpu:0,1",
                     "--model_type", "Llama-2-7B", "--config_path", str(config)]
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: any((d / "staging").is_file() for d in _dp_dirs(tmp)), launcher)
    time.sleep(1)
    ranks = [r for r in _ranks_of(launcher.pid)]
    launcher.send_signal(getattr(signal, how))
    _, err = launcher.communicate(timeout=120)
    deadline = time.time() + 30
    while any(_alive(r) for r in ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(r) for r in ranks), "ranks outlived their launcher"
    if how == "SIGTERM":
        assert launcher.returncode == 143, err
        assert _dp_dirs(tmp) == [] and leftovers(out) == []
    else:  # nothing can clean up after SIGKILL: the next run does
        rerun = quant(tiny_llama, out, config, device="cpu:0,1", env={"TMPDIR": str(tmp)})
        assert rerun.returncode == 0, rerun.stderr
        assert _dp_dirs(tmp) == [] and leftovers(out) == []
    assert not out.exists() or check(out).returncode == 0


# ---- recovery states, built by hand ------------------------------------------------------------------------
def _fake_checkpoint(path: Path, content: str, complete: bool = True) -> None:
    path.mkdir()
    (path / "quant_model_description.json").write_text(content)
    write_marker(path, complete)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_recover_finishes_a_swap_whose_new_checkpoint_is_complete(tmp_path):
    out = tmp_path / "out"
    _fake_checkpoint(tmp_path / ".out.old-0123abcd", "old")
    _fake_checkpoint(tmp_path / ".out.partial-0123abcd", "new")
    done = recover(out)
    assert (out / "quant_model_description.json").read_text() == "new" and leftovers(out) == []
    assert "completed the interrupted replacement" in done[0]


def test_recover_moves_a_complete_first_checkpoint_into_place(tmp_path):
    out = tmp_path / "out"  # killed between marking the staging directory complete and renaming it
    _fake_checkpoint(tmp_path / ".out.partial-0123abcd", "new")
    assert "completed the interrupted replacement" in recover(out)[0]
    assert (out / "quant_model_description.json").read_text() == "new" and leftovers(out) == []


def test_recover_restores_the_previous_checkpoint_when_the_new_one_is_incomplete(tmp_path):
    out = tmp_path / "out"
    _fake_checkpoint(tmp_path / ".out.old-0123abcd", "old")
    _fake_checkpoint(tmp_path / ".out.partial-0123abcd", "new", complete=False)
    marker = json.loads((tmp_path / ".out.partial-0123abcd" / MARKER).read_text())
    marker["pid"] = _dead_pid()
    (tmp_path / ".out.partial-0123abcd" / MARKER).write_text(json.dumps(marker))
    done = recover(out)
    assert (out / "quant_model_description.json").read_text() == "old" and leftovers(out) == []
    assert any("restored the previous checkpoint" in line for line in done)


def test_recover_leaves_a_running_writer_alone(tmp_path):
    out = tmp_path / "out"
    _fake_checkpoint(out, "current")
    _fake_checkpoint(tmp_path / ".out.partial-0123abcd", "being written", complete=False)
    marker = json.loads((tmp_path / ".out.partial-0123abcd" / MARKER).read_text())
    marker["pid"] = os.getppid()  # alive, and not this process
    (tmp_path / ".out.partial-0123abcd" / MARKER).write_text(json.dumps(marker))
    assert recover(out) == [] and leftovers(out) == [".out.partial-0123abcd"]


def test_a_mount_point_is_written_in_place(tiny_llama, tmp_path):
    with mounted_tmpfs(tmp_path / "volume", "64m") as out:
        config = _config(tmp_path)
        first = quant_here(tiny_llama, out, config)
        assert first.returncode == 0, first.stderr
        assert check(out).returncode == 0 and os.path.ismount(out)
        previous = snapshot(out)
        killed = quant(tiny_llama, out, config, "--overwrite", fault="swap")
        assert killed.returncode == -signal.SIGKILL
        marker = json.loads((out / MARKER).read_text())  # half-moved: the marker says so until recovered ...
        assert marker["complete"] is False and marker["swapping"]
        recovered = check(out)  # ... and check (like the next run) rolls the swap forward
        assert "completed the interrupted replacement" in recovered.stdout
        assert recovered.returncode == 0, recovered.stdout
        assert sorted(snapshot(out)) == sorted(previous) and os.path.ismount(out)
        assert [p.name for p in out.iterdir() if p.name.startswith(".msmodelslim.")] == [MARKER]


def test_recover_touches_nothing_a_crafted_marker_points_at(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    write_marker(out, False, swapping="../../victim", phase="in")
    assert recover(out) == []
    assert (victim / "data.txt").read_text() == "keep" and (out / "x").exists()
