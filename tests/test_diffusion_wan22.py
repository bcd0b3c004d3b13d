"""Wan2.2-T2V-A14B (two experts) W8A8 dynamic end to end on a tiny random two-expert diffusers WanPipeline:
diffusers' `transformer` denoises the steps t >= boundary_ratio * 1000 (the high-noise expert), `transformer_2`
the others. Each expert is calibrated on the steps at which the float pipeline calls it, dumped as
calib_data_<task>_<expert>.pth, quantized block by block and saved under save_path/<expert>/ (protocol.md 2.8);
the reader loads both back and the quantized pipeline samples.

The error bound is the Wan2.1 test's (tests/test_diffusion_wan.py: sqrt(L) * sqrt(2) * k / (127 * sqrt(12)) for
L = 20 quantized linears per DiT and crest factor k <= 4): each expert is such a DiT, and each denoiser call runs
one expert.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from msmodelslim.cli.__main__ import main
from test_diffusion_wan import DENOISER_BOUND, LINEARS_PER_BLOCK, NUM_LAYERS, SAMPLING, make_tiny_wan, write_config

diffusers = pytest.importorskip("diffusers")

BOUNDARY = 0.9  # shift 7, 3 steps: timesteps 1000 (high-noise expert), 876.5 and 46.8 (low-noise expert)
TASK = "t2v-A14B"
EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}  # {output folder: component}
SAMPLING_22 = {**SAMPLING, "task": TASK}
RECIPE = Path(__file__).resolve().parent.parent / "msmodelslim" / "model" / "diffusion" / "wan2_2_t2v_w8a8_dynamic.yaml"


def quant(model: Path, out: Path, config: Path, *extra: str, model_type: str = "Wan2.2-T2V-A14B") -> int:
    return main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", model_type, "--config_path", str(config), *extra])


def config_22(path: Path, dump_dir: str = "", **sampling) -> Path:
    return write_config(path, dump_dir=dump_dir, **{"task": TASK, **sampling})


def expected_timesteps(model: Path, steps: int) -> dict[str, list[float]]:
    """Reference: the scheduler's own schedule for `steps` steps, split at boundary_ratio * num_train_timesteps
    as WanPipeline documents it (transformer for t >= boundary, transformer_2 below)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model / "scheduler")
    scheduler.set_timesteps(steps)
    boundary = BOUNDARY * scheduler.config.num_train_timesteps
    timesteps = [float(t) for t in scheduler.timesteps]
    return {"high_noise_model": [t for t in timesteps if t >= boundary],
            "low_noise_model": [t for t in timesteps if t < boundary]}


@pytest.fixture(scope="module")
def wan22(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("wan22") / "Wan2.2-tiny", boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def quantized(wan22, tmp_path_factory) -> Path:
    """The built-in Wan2.2-T2V-A14B recipe with the tiny model's sampling; the dumps go into the output."""
    tmp = tmp_path_factory.mktemp("w8a8_22")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["spec"]["process"][0]["qconfig"]["act"]["scope"] == "per_token"
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = SAMPLING_22
    (tmp / "w8a8.yaml").write_text(yaml.safe_dump(recipe))
    assert quant(wan22, tmp / "out", tmp / "w8a8.yaml") == 0
    return tmp / "out"


def test_both_experts_are_quantized_into_their_expert_folders(wan22, quantized):
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    assert not (quantized / "transformer").exists() and not (quantized / "transformer_2").exists()
    for folder, component in EXPERTS.items():
        dit = quantized / folder
        description = json.loads((dit / "quant_model_description.json").read_text())
        weights = sorted(k for k, v in description.items() if k.endswith(".weight") and v == "W8A8_DYNAMIC")
        assert len(weights) == NUM_LAYERS * LINEARS_PER_BLOCK and all(k.startswith("blocks.") for k in weights)
        assert description["proj_out.weight"] == "FLOAT"
        assert [f for f in check_ascendv1(dit) if f.level == "error"] == []
        source_config = json.loads((wan22 / component / "config.json").read_text())
        assert json.loads((dit / "config.json").read_text()) == source_config
        assert (quantized / f"calib_data_{TASK}_{folder}.pth").is_file()
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for file in (wan22 / component).iterdir():
            assert (quantized / component / file.name).read_bytes() == file.read_bytes()
    assert (quantized / "model_index.json").read_bytes() == (wan22 / "model_index.json").read_bytes()
    assert (quantized / "wan2_2_t2v_best_practice.yaml").is_file() and not (quantized / "calib_data.pth").exists()


def test_each_expert_holds_its_own_weights(wan22, quantized):
    """high_noise_model is transformer's weights and low_noise_model transformer_2's, each within half a step of
    the int8 grid (and not within it of the other expert's: the two random DiTs differ)."""
    saved = {folder: load_file(str(quantized / folder / "quant_model_weights.safetensors")) for folder in EXPERTS}
    source = {folder: load_file(str(wan22 / component / "diffusion_pytorch_model.safetensors"))
              for folder, component in EXPERTS.items()}
    name = "blocks.1.attn1.to_q"
    for folder, other in (("high_noise_model", "low_noise_model"), ("low_noise_model", "high_noise_model")):
        q, scale = saved[folder][f"{name}.weight"].double(), saved[folder][f"{name}.weight_scale"].double()
        assert bool(((q * scale - source[folder][f"{name}.weight"].double()).abs() <= scale / 2 * (1 + 1e-6)).all())
        assert not bool(((q * scale - source[other][f"{name}.weight"].double()).abs() <= scale / 2).all())
        assert torch.equal(saved[folder]["proj_out.weight"], source[folder]["proj_out.weight"])


def test_each_expert_is_calibrated_only_on_its_own_timesteps(wan22, quantized):
    expected = expected_timesteps(wan22, SAMPLING["sample_steps"])
    assert expected["high_noise_model"] and expected["low_noise_model"]  # the boundary splits the schedule
    calls_per_step = len(SAMPLING["prompt"]) * 2  # every prompt, conditional and unconditional
    for folder in EXPERTS:
        dump = torch.load(quantized / f"calib_data_{TASK}_{folder}.pth", weights_only=True)
        assert dump["fingerprint"]["expert"] == folder
        assert sorted(dump["timesteps"]) == pytest.approx(sorted(expected[folder] * calls_per_step)), folder
        assert len(dump["samples"]) == len(expected[folder]) * calls_per_step


def test_the_quantized_pipeline_samples_within_the_int8_bound(wan22, quantized):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.model.diffusion import WAN2_2_T2V

    float_pipe = WAN2_2_T2V.load_pipeline(wan22, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(quantized, WAN2_2_T2V)  # everything from the output folder alone
    assert quant_pipe.config.boundary_ratio == BOUNDARY
    for dit in (quant_pipe.transformer, quant_pipe.transformer_2):
        linears = [m for m in dit.modules() if isinstance(m, QuantLinear)]
        assert len(linears) == NUM_LAYERS * LINEARS_PER_BLOCK
    # held-out prompts, 4 steps (1000, 934, 781.4, 46.8): timesteps calibration never visited, both experts called
    report = compare_pipelines(float_pipe, quant_pipe, WAN2_2_T2V, saved_sampling(quantized, WAN2_2_T2V, steps=4),
                               ["a red kite above a beach", "a train on a snowy bridge"])
    print(report.table())
    expected = expected_timesteps(wan22, 4)
    for folder in EXPERTS:
        errors = report.rel_errors_by_expert[folder]
        assert len(errors) == 2 * 2 * len(expected[folder]), folder  # prompts x (cond, uncond) x its steps
        assert 0 < max(errors) < DENOISER_BOUND, report.table()
    assert min(report.cosines) > 1 - DENOISER_BOUND ** 2 / 2
    assert all(p > 20 for p in report.latent_psnr_db), report.table()
    assert all(f"({folder}, {len(report.rel_errors_by_expert[folder])} calls)" in report.table() for folder in EXPERTS)


def test_msmodelslim_eval_finds_the_two_experts_from_the_folder(wan22, quantized, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite above a beach\n")
    assert main(["eval", "--model_path", str(wan22), "--quant_path", str(quantized), "--dataset", str(prompts),
                 "--max_windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "high_noise_model" in out and "low_noise_model" in out and "final-latent PSNR" in out


def test_each_experts_dump_is_reused_and_a_missing_one_captured_again(wan22, tmp_path, sampling_calls):
    dump = tmp_path / "dump"
    config = config_22(tmp_path / "c.yaml", dump_dir=str(dump))
    assert quant(wan22, tmp_path / "a", config) == 0
    assert len(sampling_calls) == len(SAMPLING["prompt"])
    files = {folder: dump / f"calib_data_{TASK}_{folder}.pth" for folder in EXPERTS}
    assert all(f.is_file() for f in files.values())
    high_bytes = files["high_noise_model"].read_bytes()
    sampling_calls.clear()
    assert quant(wan22, tmp_path / "b", config) == 0
    assert sampling_calls == []  # both dumps read, nothing sampled
    files["low_noise_model"].unlink()
    assert quant(wan22, tmp_path / "c", config) == 0
    assert len(sampling_calls) == len(SAMPLING["prompt"])  # the missing expert's dump needs a float sampling
    assert files["low_noise_model"].is_file() and files["high_noise_model"].read_bytes() == high_bytes
    for folder in EXPERTS:
        a = load_file(str(tmp_path / "a" / folder / "quant_model_weights.safetensors"))
        for run in ("b", "c"):
            b = load_file(str(tmp_path / run / folder / "quant_model_weights.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (folder, run)


def test_a_stale_or_swapped_dump_is_refused(wan22, tmp_path, sampling_calls, capsys):
    dump = tmp_path / "dump"
    assert quant(wan22, tmp_path / "a", config_22(tmp_path / "c.yaml", dump_dir=str(dump))) == 0
    sampling_calls.clear()
    capsys.readouterr()
    assert quant(wan22, tmp_path / "b", config_22(tmp_path / "d.yaml", dump_dir=str(dump), sample_steps=4)) == 2
    err = capsys.readouterr().err
    assert "inference_config.sample_steps (3 in the dump, 4 now)" in err and "high_noise_model.pth" in err, err
    high, low = (dump / f"calib_data_{TASK}_{folder}.pth" for folder in EXPERTS)
    shutil.copyfile(high, low)  # the high-noise expert's activations under the low-noise expert's name
    assert quant(wan22, tmp_path / "c", config_22(tmp_path / "c.yaml", dump_dir=str(dump))) == 2
    err = capsys.readouterr().err
    assert "expert (high_noise_model in the dump, low_noise_model now)" in err, err
    assert sampling_calls == [] and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_dry_run_plans_both_experts_and_the_model_type_comes_from_the_folder(wan22, tmp_path, capsys):
    assert main(["quant", "--model_path", str(wan22), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--config_path", str(config_22(tmp_path / "c.yaml")), "--dry_run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == 2 * NUM_LAYERS * LINEARS_PER_BLOCK
    assert plan[0].endswith("high_noise_model/blocks.0.attn1.to_q")
    assert plan[-1].endswith("low_noise_model/blocks.1.ffn.net.2")
    assert not (tmp_path / "out").exists()


def test_the_line_name_wan2_2_runs_the_model_its_folder_holds(wan22, tmp_path, capsys):
    """--model_type Wan2.2 (the established tool's name for the whole line): model_index.json says which model."""
    config = config_22(tmp_path / "c.yaml")
    assert quant(wan22, tmp_path / "out", config, "--dry_run", model_type="Wan2.2") == 0
    line = capsys.readouterr()
    assert quant(wan22, tmp_path / "out", config, "--dry_run") == 0
    assert line.out.splitlines() == capsys.readouterr().out.splitlines()
    assert "run as Wan2.2-T2V-A14B" in line.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,sampling,needle", [
    ("Wan2.1", {"task": "t2v-14B"}, "two denoisers"),
    ("Wan2.2-T2V-A14B", {"task": "i2v-A14B"}, "task 'i2v-A14B'"),
    ("Wan2.2-I2V-A14B", {"image": "/no/such.png"}, "image '/no/such.png' is not a file"),
])
def test_what_is_missing_is_refused_by_name(wan22, tmp_path, monkeypatch, capsys, model_type, sampling, needle):
    monkeypatch.setattr("msmodelslim.model.diffusion.wan.DiffusionFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    assert quant(wan22, tmp_path / "out", config_22(tmp_path / "c.yaml", **sampling), model_type=model_type) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---- Wan2.2-TI2V-5B: one DiT, expand_timesteps (a timestep per latent token), the 48-channel VAE of factor 16 ----
def test_ti2v_5b_quantizes_its_single_dit_and_samples_within_the_bound(tmp_path_factory, capsys):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.model.diffusion import WAN2_2_TI2V

    tmp = tmp_path_factory.mktemp("ti2v")
    model = make_tiny_wan(tmp / "Wan2.2-TI2V-tiny", ti2v=True)
    recipe = yaml.safe_load((RECIPE.parent / "wan2_2_ti2v_w8a8_dynamic.yaml").read_text())
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = {**SAMPLING, "task": "ti2v-5B"}
    (tmp / "c.yaml").write_text(yaml.safe_dump(recipe))
    # the 64*64 frames of the Wan2.1 tests fit the factor 16 x patch 2; 48 does not, refused before any weight
    bad = {**recipe, "spec": {**recipe["spec"], "multimodal_sd_config": {"inference_config": {
        **SAMPLING, "size": "48*64"}}}}
    (tmp / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert quant(model, tmp / "bad", tmp / "bad.yaml", model_type="Wan2.2-TI2V-5B") == 2
    assert "width must be a multiple of 32" in capsys.readouterr().err
    assert quant(model, tmp / "wan21", write_config(tmp / "plain.yaml"), model_type="Wan2.1") == 2  # not Wan2.1's
    assert "Use --model_type Wan2.2-TI2V-5B" in capsys.readouterr().err
    assert quant(model, tmp / "out", tmp / "c.yaml", model_type="Wan2.2-TI2V-5B") == 0
    out = tmp / "out"
    description = json.loads((out / "transformer" / "quant_model_description.json").read_text())
    assert sum(v == "W8A8_DYNAMIC" for k, v in description.items() if k.endswith(".weight")) == 20
    dump = torch.load(out / "calib_data.pth", weights_only=True)  # a single DiT: no task/expert in the name
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model / "scheduler")
    scheduler.set_timesteps(SAMPLING["sample_steps"])
    assert sorted(dump["timesteps"]) == pytest.approx(sorted([float(t) for t in scheduler.timesteps] * 4))
    float_pipe = WAN2_2_TI2V.load_pipeline(model, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(out, WAN2_2_TI2V)
    assert quant_pipe.config.expand_timesteps
    report = compare_pipelines(float_pipe, quant_pipe, WAN2_2_TI2V, saved_sampling(out, WAN2_2_TI2V, steps=4),
                               ["a red kite above a beach"])
    print(report.table())
    assert 0 < max(report.rel_errors) < DENOISER_BOUND and all(p > 20 for p in report.latent_psnr_db), report.table()
