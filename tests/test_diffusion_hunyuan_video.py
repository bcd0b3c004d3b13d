"""HunyuanVideo W8A8 dynamic end to end on a tiny random diffusers HunyuanVideoPipeline (multimodal_sd_modelslim_v1):
quant -> ascendv1 (and mindie) DiT + copied components -> format check -> reader -> the quantized pipeline samples;
the walk over both kinds of blocks, whose outputs are (hidden_states, encoder_hidden_states); refusals by name.

Denoiser error bound (tests/tiny_dit.py): the tiny DiT has L = 2*14 + 2*6 = 40 quantized linears (as FLUX.1's):
sqrt(40)*sqrt(2)*4/(127*sqrt(12)) = 0.081.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_dit import (CREST_FACTOR, W8A8_DYNAMIC, count_pipeline_calls, int8_bound, make_tiny_hunyuan_video, quant,
                      write_config)

diffusers = pytest.importorskip("diffusers")

DUAL, SINGLE = 2, 2
LINEARS_DUAL, LINEARS_SINGLE = 14, 6
LINEARS = DUAL * LINEARS_DUAL + SINGLE * LINEARS_SINGLE
SAMPLING = {"prompt": ["a cat walks on the grass", "a dog runs in the snow"], "height": 32, "width": 32,
            "num_frames": 5, "num_inference_steps": 3, "max_sequence_length": 16, "guidance_scale": 6.0,
            "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
RECIPE = (Path(__file__).resolve().parent.parent / "msmodelslim" / "model" / "diffusion"
          / "hunyuan_video_w8a8_dynamic.yaml")
MODEL_TYPE = "HunyuanVideo"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan") / "HunyuanVideo-tiny")


@pytest.fixture
def sampling_calls(monkeypatch) -> list:
    return count_pipeline_calls(monkeypatch, "HunyuanVideoPipeline")


@pytest.fixture(scope="module")
def quantized(model, tmp_path_factory) -> Path:
    """The built-in practice (--quant_type w8a8), with the tiny model's sampling."""
    tmp = tmp_path_factory.mktemp("w8a8")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["spec"]["process"] == [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"]}]
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = SAMPLING
    (tmp / "w8a8.yaml").write_text(yaml.safe_dump(recipe))
    assert quant(model, tmp / "out", tmp / "w8a8.yaml", "hunyuan_video") == 0  # any of upstream's spellings
    return tmp / "out"


def test_w8a8_dynamic_quantizes_both_kinds_of_blocks_and_copies_the_rest(model, quantized):
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    dit = quantized / "transformer"
    description = json.loads((dit / "quant_model_description.json").read_text())
    weights = sorted(k for k, v in description.items() if k.endswith(".weight") and v == "W8A8_DYNAMIC")
    assert len(weights) == LINEARS
    assert sum(k.startswith("transformer_blocks.") for k in weights) == DUAL * LINEARS_DUAL
    assert sum(k.startswith("single_transformer_blocks.") for k in weights) == SINGLE * LINEARS_SINGLE
    # the token refiner runs before the blocks: float, like everything outside them
    assert any(k.startswith("context_embedder.token_refiner.") and v == "FLOAT" for k, v in description.items())
    assert [f for f in check_ascendv1(dit) if f.level == "error"] == []
    for component in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for file in (model / component).iterdir():
            assert (quantized / component / file.name).read_bytes() == file.read_bytes()
    assert (quantized / "hunyuan_video_best_practice.yaml").is_file()
    dump = torch.load(quantized / "calib_data.pth", weights_only=True)
    assert len(dump["samples"]) == 12 and len(dump["samples"][0]) == 7  # 2 prompts x 3 steps x (cond, negative)


def test_the_quantized_pipeline_samples_within_the_int8_bound(model, quantized):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.model.diffusion import HUNYUAN_VIDEO

    float_pipe = HUNYUAN_VIDEO.load_pipeline(model, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(quantized, HUNYUAN_VIDEO)
    linears = [m for m in quant_pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == LINEARS and {m.scheme.value for m in linears} == {"W8A8_DYNAMIC"}
    sampling = saved_sampling(quantized, HUNYUAN_VIDEO, steps=4)
    report = compare_pipelines(float_pipe, quant_pipe, HUNYUAN_VIDEO, sampling, ["a red kite above a beach"])
    print(report.table())
    assert len(report.rel_errors) == 1 * 4 * 2
    bound = int8_bound(LINEARS)
    assert 0 < max(report.rel_errors) < bound, report.table()
    assert min(report.cosines) > 1 - bound ** 2 / 2
    assert all(math.isfinite(p) and p > 20 for p in report.latent_psnr_db), report.table()


@torch.no_grad()
def test_each_quantized_block_update_is_within_the_int8_bound(model, quantized):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import HUNYUAN_VIDEO

    float_dit = HUNYUAN_VIDEO.load_pipeline(model, torch.device("cpu")).transformer
    quant_dit = load_quantized_denoiser(quantized / "transformer", HUNYUAN_VIDEO)
    samples = torch.load(quantized / "calib_data.pth", weights_only=True)["samples"]
    worst = {"transformer_blocks": 0.0, "single_transformer_blocks": 0.0}
    for args in samples:
        for stream in args[:2]:
            crest = stream.abs().amax(-1) / stream.pow(2).mean(-1).sqrt()
            assert float(crest.max()) <= CREST_FACTOR
        for (name, f_block), (_, q_block) in zip(HUNYUAN_VIDEO.walk(float_dit), HUNYUAN_VIDEO.walk(quant_dit)):
            f_out, q_out = f_block(*args), q_block(*args)
            kind = name.split(".")[0]
            for f_stream, q_stream, x in zip(f_out, q_out, args[:2]):  # (hidden, encoder) in and out
                worst[kind] = max(worst[kind], float((q_stream - f_stream).norm() / (f_stream - x).norm()))
            args = HUNYUAN_VIDEO.next_inputs(args, f_out)
    print("worst block update errors", worst, int8_bound(LINEARS_DUAL), int8_bound(LINEARS_SINGLE))
    assert 0 < worst["transformer_blocks"] < int8_bound(LINEARS_DUAL), worst
    assert 0 < worst["single_transformer_blocks"] < int8_bound(LINEARS_SINGLE), worst


def test_mindie_format_reads_back_with_the_same_tensors(model, quantized, tmp_path, sampling_calls):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import HUNYUAN_VIDEO

    (tmp_path / "dump").mkdir()
    shutil.copyfile(quantized / "calib_data.pth", tmp_path / "dump" / "calib_data.pth")
    config = write_config(tmp_path / "c.yaml", SAMPLING, save=[{"type": "mindie_format_saver", "part_file_size": 0}],
                          dump_dir=str(tmp_path / "dump"))
    assert quant(model, tmp_path / "out", config, MODEL_TYPE) == 0
    assert sampling_calls == []
    dit = tmp_path / "out" / "transformer"
    saved = load_file(str(dit / "quant_model_weight_w8a8_dynamic.safetensors"))
    ascend = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
    assert saved.keys() == ascend.keys() and all(torch.equal(saved[k], ascend[k]) for k in saved)
    assert len(HUNYUAN_VIDEO.walk(load_quantized_denoiser(dit, HUNYUAN_VIDEO))) == DUAL + SINGLE


def test_msmodelslim_eval_prints_the_before_after_table(model, quantized, tmp_path, capsys):
    from msmodelslim.cli.__main__ import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite above a beach\n")
    assert main(["eval", "--model_path", str(model), "--quant_path", str(quantized), "--dataset", str(prompts),
                 "--max_windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "denoiser relative error, mean" in out and "final-latent PSNR after 4 steps" in out


def test_the_built_in_practice_plans_without_loading(model, tmp_path, monkeypatch, capsys):
    from msmodelslim.cli.__main__ import main

    monkeypatch.setattr("msmodelslim.model.diffusion.dit.DiTFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["quant", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--quant_type", "w8a8", "--dry_run"]) == 0  # 720x1280: 720 = 45*16
    assert len(capsys.readouterr().out.splitlines()) == LINEARS and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,needle", [
    ({"num_frames": 6}, "num_frames 6 must be 4k+1"),
    ({"height": 36}, "must be multiples of 8"),
    ({"frame_num": 5}, "inference_config.frame_num: unknown key"),
])
def test_bad_sampling_settings_are_refused_before_any_weight(model, tmp_path, capsys, sampling_calls, change, needle):
    assert quant(model, tmp_path / "out", write_config(tmp_path / "c.yaml", {**SAMPLING, **change}), MODEL_TYPE) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and sampling_calls == []


def test_image_to_video_is_refused_by_name(model, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "HunyuanVideoImageToVideoPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    assert quant(copy, tmp_path / "out", write_config(tmp_path / "c.yaml", SAMPLING), MODEL_TYPE) == 2
    assert "HunyuanVideo image-to-video" in capsys.readouterr().err


def test_w8a8_static_ranges_come_from_the_walk_over_both_kinds_of_blocks(model, quantized, tmp_path):
    """A calibrating recipe: each block is calibrated on the previous block's (hidden_states,
    encoder_hidden_states), dual-stream into single-stream. Every linear's static input scale equals the one from
    the float pipeline's own sampling."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import HUNYUAN_VIDEO
    from tiny_dit import W8A8_STATIC, reference_input_scales

    (tmp_path / "dump").mkdir()
    shutil.copyfile(quantized / "calib_data.pth", tmp_path / "dump" / "calib_data.pth")
    config = write_config(tmp_path / "c.yaml", SAMPLING, process=[{"type": "linear_quant", "qconfig": W8A8_STATIC}],
                          dump_dir=str(tmp_path / "dump"))
    assert quant(model, tmp_path / "out", config, MODEL_TYPE) == 0
    dit = load_quantized_denoiser(tmp_path / "out" / "transformer", HUNYUAN_VIDEO)
    expected = reference_input_scales(HUNYUAN_VIDEO.load_pipeline(model, torch.device("cpu")), HUNYUAN_VIDEO,
                                      HUNYUAN_VIDEO.inference_config(SAMPLING, "test"))
    got = {f"{name}.{child}": float(m.input_scale) for name, block in HUNYUAN_VIDEO.walk(dit)
           for child, m in block.named_modules() if getattr(m, "input_scale", None) is not None}
    assert got.keys() == expected.keys() and len(got) == LINEARS
    worst = max(abs(got[k] / expected[k] - 1) for k in got)
    assert worst < 1e-4, worst
