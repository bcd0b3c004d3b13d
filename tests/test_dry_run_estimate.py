"""`quant --dry_run` estimates of the real run (issue #23, item 5): peak RSS, output bytes (and whether the disk has
room), wall time, from timing the first block. The disk estimate is checked against the real output; memory and
time only for being present and sane (no timing assertions)."""
import pytest

from helpers import SCHEMES, run_quant, small_calib, write_config
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import UnsupportedError

BOTH = [{"type": "ascendv1_saver", "part_file_size": 4}, {"type": "compressed_tensors", "part_file_size": 4}]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quant_args(model, out, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu", *extra]


def output_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("scheme, part_file_size", [("w8a8_dynamic", 4), ("w8a8_static", 0.0001), ("w4a16_g16", 0)])
def test_disk_estimate_is_within_a_quarter_of_the_real_output(tiny_llama, tmp_path, scheme, part_file_size):
    config = write_config(tmp_path / "c.yaml", SCHEMES[scheme], dataset=small_calib(tmp_path),
                          part_file_size=part_file_size)
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert not (tmp_path / "dry").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    real = output_bytes(run_quant(tiny_llama, tmp_path / "out", config).save_path)
    assert abs(estimate.total_output_bytes - real) <= 0.25 * real, (estimate.output_bytes, real)


def test_both_formats_are_estimated_each(tiny_llama, tmp_path):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": small_calib(tmp_path), "save": BOTH,
        "process": [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}]}}))
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    out = run_quant(tiny_llama, tmp_path / "out", config).save_path
    for saver, folder in (("ascendv1_saver", "ascendv1"), ("compressed_tensors", "compressed_tensors")):
        real = output_bytes(out / folder)
        assert abs(estimate.output_bytes[saver] - real) <= 0.25 * real, (saver, estimate.output_bytes[saver], real)


def test_the_estimate_fields_are_present_and_sane(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert 50 * 2**20 < estimate.peak_rss_bytes < 64 * 2**30  # at least the interpreter with torch; far from absurd
    assert estimate.seconds > 0 and set(estimate.seconds_by_phase) >= {"calibration forwards", "writing", "loading"}
    assert all(s >= 0 for s in estimate.seconds_by_phase.values())
    assert estimate.disk_has_room and estimate.free_bytes > 0
    assert estimate.batches >= estimate.timed_batches >= 1 and estimate.blocks == 2
    assert any("early stopping" in a for a in estimate.assumptions)


def test_the_cli_prints_the_estimates_as_comments(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"], dataset=small_calib(tmp_path))
    code, stdout, _ = run_cli(capsys, *quant_args(tiny_llama, tmp_path / "out", "--model_type", "Llama-2-7B",
                                                  "--config_path", str(config), "--dry_run"))
    assert code == 0 and "# ESTIMATES for the real run (not measurements" in stdout
    for field in ("peak RAM (RSS)", "output on disk", "has room", "wall time", "assuming"):
        assert field in stdout
    assert not (tmp_path / "out").exists()
    code, stdout, _ = run_cli(capsys, *quant_args(tiny_llama, tmp_path / "out", "--model_type", "Llama-2-7B",
                                                  "--config_path", str(config), "--dry_run", "--no_estimate"))
    assert code == 0 and "ESTIMATES" not in stdout


def test_a_disk_without_room_is_said(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"], dataset=small_calib(tmp_path))
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert estimate.disk_has_room and "has room" in "\n".join(estimate.lines())
    estimate.free_bytes = estimate.total_output_bytes - 1  # the comparison the report makes
    assert not estimate.disk_has_room and "does NOT have room" in "\n".join(estimate.lines())


def test_a_refusal_still_comes_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a weight was read")))
    import yaml

    config = tmp_path / "c.yaml"
    pd_mix = {"act": {"dtype": "int8", "scope": "pd_mix", "symmetric": False, "method": "minmax"},
              "weight": SCHEMES["w8a8_static"]["weight"]}
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "dataset": small_calib(tmp_path), "save": [{"type": "compressed_tensors"}],
        "process": [{"type": "linear_quant", "qconfig": pd_mix, "exclude": ["lm_head"]}]}}))
    with pytest.raises(UnsupportedError, match="compressed_tensors cannot hold"):
        run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True)


@pytest.mark.parametrize("schedule, want", [("0", "=0: after every block"), ("off", None),
                                            ("auto", "MSMODELSLIM_CHECKPOINT_SECONDS=auto")])
def test_the_checkpoints_counted_follow_the_schedule(tiny_llama, tmp_path, monkeypatch, schedule, want):
    """Every block (2 here), none, or as many as the default rule gives for the measured block (the first and the
    last at least: both, on a two-block model)."""
    monkeypatch.setenv("MSMODELSLIM_CHECKPOINT_SECONDS", schedule)
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    lines = [a for a in estimate.assumptions if "resume checkpoint" in a]
    if want is None:
        assert lines == []
    else:
        assert len(lines) == 1 and want in lines[0] and lines[0].startswith("2 resume checkpoints"), lines


def test_writing_goes_at_the_disks_speed_past_the_dirty_budget_or_when_checkpoints_fsync(monkeypatch):
    """10 s into the page cache or 40 s to the disk for 8 GB: a 2 GB budget leaves 6 GB for the disk (30 s);
    checkpoints fsync all 8 GB (40 s); an output inside the budget costs the cached time."""
    from msmodelslim.app import estimate_output

    monkeypatch.setattr(estimate_output, "dirty_page_budget", lambda: 2 << 30)
    gb8 = 8 << 30
    assert estimate_output.writing_seconds(10.0, 40.0, gb8, synced=False) == pytest.approx(30.0)
    assert estimate_output.writing_seconds(10.0, 40.0, gb8, synced=True) == pytest.approx(40.0)
    assert estimate_output.writing_seconds(10.0, 40.0, 1 << 30, synced=False) == pytest.approx(10.0)


def test_the_heap_allowance_counts_the_unmeasured_batches_below_the_reuse_cap(monkeypatch):
    """A 48 MiB temporary (SmolLM2's gate/up output over 16 x 512 tokens) and 4 batches, 1 measured: 3 x 48 MiB; 20
    batches count as FRAGMENTING_BATCHES; all measured: nothing; above MSMODELSLIM_HEAP_REUSE_MIB (its own
    mapping, no hole left in the heap): nothing."""
    from msmodelslim.app import estimate

    mib = 1 << 20
    monkeypatch.delenv("MSMODELSLIM_HEAP_REUSE_MIB", raising=False)
    assert estimate._fragmentation_bytes(48 * mib, batches=4, timed=1) == 3 * 48 * mib
    assert estimate._fragmentation_bytes(48 * mib, batches=20, timed=1) == estimate.FRAGMENTING_BATCHES * 48 * mib
    assert estimate._fragmentation_bytes(48 * mib, batches=4, timed=4) == 0
    monkeypatch.setenv("MSMODELSLIM_HEAP_REUSE_MIB", "32")
    assert estimate._fragmentation_bytes(48 * mib, batches=4, timed=1) == 0
    assert estimate._fragmentation_bytes(16 * mib, batches=4, timed=1) == 3 * 16 * mib


def test_the_dry_run_measures_the_largest_temporary_of_a_calibrated_block(tiny_llama, tmp_path):
    """The heap allowance rests on the block's largest temporary, measured in its calibration forwards; a
    data-free scheme has no forward and no allowance."""
    import re

    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path))
    estimate = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    (line,) = [a for a in estimate.assumptions if a.startswith("the C heap")]
    assert float(re.search(r"temporaries \(([\d.]+) MiB\)", line).group(1)) > 0
    config = write_config(tmp_path / "d.yaml", SCHEMES["w8a8_dynamic"])
    estimate = run_quant(tiny_llama, tmp_path / "dry2", config, dry_run=True, estimate=True).estimate
    assert not [a for a in estimate.assumptions if a.startswith("the C heap")]
