"""--save_path is never a place whose loss would hurt: not the working directory or its parents, not home or
/, not a folder of other files (with --overwrite or not); a full disk keeps the previous checkpoint."""
import errno
import os
from pathlib import Path

import pytest

from helpers import SCHEMES, mounted_tmpfs, write_config
from msmodelslim.cli.__main__ import main


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "w8a16.yaml", SCHEMES["w8a16"])


def quant(capsys, model, save_path: str, config, *extra):
    code = main(["quant", "--model_path", str(model), "--save_path", save_path, "--device", "cpu",
                 "--model_type", "Llama-2-7B", "--config_path", str(config), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("save_path,why", [
    ("", "names the working directory"),
    (".", "names the working directory"),
    ("./", "names the working directory"),
    ("..", "a parent of the working directory"),
    ("../..", "a parent of the working directory"),
    ("/", "the root of the file system"),
    ("~", "your home directory"),
    ("HOME", "your home directory"),
    ("CWD", "the working directory"),
])
def test_protected_locations_are_never_replaced(tiny_llama, tmp_path, capsys, monkeypatch, config, save_path, why):
    work = tmp_path / "home" / "code" / "lab" / "project"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("the user's work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_path = {"HOME": str(tmp_path / "home"), "CWD": str(work)}.get(save_path, save_path)
    before = _tree(tmp_path / "home")
    for extra in ((), ("--overwrite",)):
        code, err = quant(capsys, tiny_llama, save_path, config, *extra)
        assert code == 2 and why in err, err
        assert _tree(tmp_path / "home") == before
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_a_previous_checkpoint(tiny_llama, tmp_path, capsys, config):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    code, err = quant(capsys, tiny_llama, str(other), config, "--overwrite")
    assert code == 2 and "not an msmodelslim checkpoint" in err and "--overwrite only replaces" in err
    assert _tree(other) == {"holiday.jpg": b"\xff\xd8 not a checkpoint"}
    out = tmp_path / "out"
    assert quant(capsys, tiny_llama, str(out), config)[0] == 0
    assert quant(capsys, tiny_llama, str(out), config, "--overwrite")[0] == 0
    legacy = tmp_path / "legacy"  # written by an earlier version: no marker, but a description
    legacy.mkdir()
    (legacy / "quant_model_description.json").write_text("{}")
    assert quant(capsys, tiny_llama, str(legacy), config, "--overwrite")[0] == 0
    assert (legacy / ".msmodelslim.json").exists()


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_llama, tmp_path, capsys, monkeypatch, config):
    out = tmp_path / "out"
    assert quant(capsys, tiny_llama, str(out), config)[0] == 0
    previous = _tree(out)

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("msmodelslim.format.shards._OpenShard.write", disk_full)
    code, err = quant(capsys, tiny_llama, str(out), config, "--overwrite")
    assert code == 6 and "no space left" in err and "was not changed" in err, err
    assert _tree(out) == previous
    assert not list(tmp_path.glob(".out.*"))


def test_a_write_failing_on_the_writer_thread_keeps_the_previous_checkpoint(tiny_llama, tmp_path, capsys, monkeypatch,
                                                                            config):
    """Shard data is written behind the work, on a thread: its error still ends the run, cleanly."""
    out = tmp_path / "out"
    assert quant(capsys, tiny_llama, str(out), config)[0] == 0
    previous = _tree(out)
    monkeypatch.setattr("msmodelslim.format.shards._append",
                        lambda file, tensor: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, err = quant(capsys, tiny_llama, str(out), config, "--overwrite")
    assert code == 6 and "no space left" in err and "was not changed" in err, err
    assert _tree(out) == previous
    assert not list(tmp_path.glob(".out.*"))


def test_a_really_full_disk_keeps_the_previous_checkpoint(tiny_llama, tmp_path, capsys, config):
    """The same on a real 2 MB file system: one checkpoint fits, the old and the new together do not."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        assert quant(capsys, tiny_llama, str(out), config)[0] == 0
        previous = _tree(out)
        code, err = quant(capsys, tiny_llama, str(out), config, "--overwrite")
        assert code == 6 and "no space left" in err, err
        assert _tree(out) == previous and sorted(p.name for p in disk.iterdir()) == ["out"]
