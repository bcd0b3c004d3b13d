"""Qwen-Image-Edit-2509 W8A8 dynamic end to end on a tiny random diffusers QwenImageEditPlusPipeline
(multimodal_sd_modelslim_v1): quant -> ascendv1 (and mindie) DiT + copied components -> format check -> reader ->
the quantized pipeline edits the same input image; refusals by name.

Denoiser error bound (tests/tiny_dit.py): the tiny DiT has L = 2*14 = 28 quantized linears (a block: image and
text q/k/v/out, two feed-forwards of two linears, two modulations): sqrt(28)*sqrt(2)*4/(127*sqrt(12)) = 0.068.

diffusers resizes every input image to about 1024*1024 pixels before the VAE encodes it (VAE_IMAGE_SIZE, a module
constant): the tests set it to 32*32 so that the tiny pipeline's image stream stays 2*64 tokens.
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

from tiny_dit import (CREST_FACTOR, W8A8_DYNAMIC, count_pipeline_calls, int8_bound, make_picture,
                      make_tiny_qwen_image_edit, quant, write_config)

diffusers = pytest.importorskip("diffusers")

BLOCKS, LINEARS_PER_BLOCK = 2, 14
LINEARS = BLOCKS * LINEARS_PER_BLOCK
RECIPE = (Path(__file__).resolve().parent.parent / "msmodelslim" / "model" / "diffusion"
          / "qwen_image_edit_w8a8_dynamic.yaml")
MODEL_TYPE = "Qwen-Image-Edit-2509"


@pytest.fixture(scope="module", autouse=True)
def small_vae_images():
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_qwen_image_edit(tmp_path_factory.mktemp("qie") / "Qwen-Image-Edit-tiny")


@pytest.fixture(scope="module")
def sampling(tmp_path_factory) -> dict:
    picture = make_picture(tmp_path_factory.mktemp("images") / "input.png")
    return {"prompt": ["make the disc blue", "add a red border"], "image": str(picture), "height": 32, "width": 32,
            "num_inference_steps": 3, "max_sequence_length": 64, "true_cfg_scale": 4.0, "negative_prompt": " "}


@pytest.fixture
def sampling_calls(monkeypatch) -> list:
    return count_pipeline_calls(monkeypatch, "QwenImageEditPlusPipeline")


@pytest.fixture(scope="module")
def quantized(model, sampling, tmp_path_factory) -> Path:
    """The built-in practice (--quant_type w8a8), with the tiny model's sampling."""
    tmp = tmp_path_factory.mktemp("w8a8")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["spec"]["process"] == [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"]}]
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = sampling
    (tmp / "w8a8.yaml").write_text(yaml.safe_dump(recipe))
    assert quant(model, tmp / "out", tmp / "w8a8.yaml", MODEL_TYPE) == 0
    return tmp / "out"


def test_w8a8_dynamic_quantizes_the_block_linears_and_copies_the_rest(model, quantized):
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    dit = quantized / "transformer"
    description = json.loads((dit / "quant_model_description.json").read_text())
    weights = sorted(k for k, v in description.items() if k.endswith(".weight") and v == "W8A8_DYNAMIC")
    assert len(weights) == LINEARS and all(k.startswith("transformer_blocks.") for k in weights)
    assert {"transformer_blocks.1.txt_mod.1.weight", "transformer_blocks.0.attn.to_add_out.weight"} <= set(weights)
    assert description["proj_out.weight"] == "FLOAT" and description["img_in.weight"] == "FLOAT"
    assert [f for f in check_ascendv1(dit) if f.level == "error"] == []
    for component in ("vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        for file in (model / component).iterdir():
            assert (quantized / component / file.name).read_bytes() == file.read_bytes()
    dump = torch.load(quantized / "calib_data.pth", weights_only=True)
    # 2 prompts x 3 steps x (conditional, negative); the keyword call captured as the block's 7 positional arguments
    assert len(dump["samples"]) == 12 and len(dump["samples"][0]) == 7


def test_the_quantized_pipeline_edits_within_the_int8_bound(model, quantized):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.model.diffusion import QWEN_IMAGE_EDIT

    float_pipe = QWEN_IMAGE_EDIT.load_pipeline(model, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(quantized, QWEN_IMAGE_EDIT)  # everything from the output folder alone
    linears = [m for m in quant_pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == LINEARS and {m.scheme.value for m in linears} == {"W8A8_DYNAMIC"}
    sampling = saved_sampling(quantized, QWEN_IMAGE_EDIT, steps=4)  # the saved image; unseen prompts and steps
    report = compare_pipelines(float_pipe, quant_pipe, QWEN_IMAGE_EDIT, sampling, ["turn it into a night scene"])
    print(report.table())
    assert len(report.rel_errors) == 1 * 4 * 2  # prompts x steps x (conditional, negative)
    bound = int8_bound(LINEARS)
    assert 0 < max(report.rel_errors) < bound, report.table()
    assert min(report.cosines) > 1 - bound ** 2 / 2
    assert all(math.isfinite(p) and p > 20 for p in report.latent_psnr_db), report.table()


@torch.no_grad()
def test_each_quantized_block_update_is_within_the_int8_bound(model, quantized):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import QWEN_IMAGE_EDIT

    float_dit = QWEN_IMAGE_EDIT.load_pipeline(model, torch.device("cpu")).transformer
    quant_dit = load_quantized_denoiser(quantized / "transformer", QWEN_IMAGE_EDIT)
    samples = torch.load(quantized / "calib_data.pth", weights_only=True)["samples"]
    worst = 0.0
    for args in samples:
        for stream in args[:2]:
            crest = stream.abs().amax(-1) / stream.pow(2).mean(-1).sqrt()
            assert float(crest.max()) <= CREST_FACTOR
        for (_, f_block), (_, q_block) in zip(QWEN_IMAGE_EDIT.walk(float_dit), QWEN_IMAGE_EDIT.walk(quant_dit)):
            f_out, q_out = f_block(*args), q_block(*args)
            for f_stream, q_stream, x in ((f_out[1], q_out[1], args[0]), (f_out[0], q_out[0], args[1])):
                worst = max(worst, float((q_stream - f_stream).norm() / (f_stream - x).norm()))
            args = QWEN_IMAGE_EDIT.next_inputs(args, f_out)
    print("worst block update error", worst, int8_bound(LINEARS_PER_BLOCK))
    assert 0 < worst < int8_bound(LINEARS_PER_BLOCK)


def test_mindie_format_reads_back_with_the_same_tensors(model, quantized, sampling, tmp_path, sampling_calls):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import QWEN_IMAGE_EDIT

    (tmp_path / "dump").mkdir()
    shutil.copyfile(quantized / "calib_data.pth", tmp_path / "dump" / "calib_data.pth")  # reused: no sampling
    config = write_config(tmp_path / "c.yaml", sampling, save=[{"type": "mindie_format_saver", "part_file_size": 0}],
                          dump_dir=str(tmp_path / "dump"))
    assert quant(model, tmp_path / "out", config, MODEL_TYPE) == 0
    assert sampling_calls == []
    dit = tmp_path / "out" / "transformer"
    saved = load_file(str(dit / "quant_model_weight_w8a8_dynamic.safetensors"))
    ascend = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
    assert saved.keys() == ascend.keys() and all(torch.equal(saved[k], ascend[k]) for k in saved)
    assert len(QWEN_IMAGE_EDIT.walk(load_quantized_denoiser(dit, QWEN_IMAGE_EDIT))) == BLOCKS


def test_msmodelslim_eval_prints_the_before_after_table(model, quantized, tmp_path, capsys):
    from msmodelslim.cli.__main__ import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("turn it into a night scene\n")
    assert main(["eval", "--model_path", str(model), "--quant_path", str(quantized), "--dataset", str(prompts),
                 "--max_windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "denoiser relative error, mean" in out and "final-latent PSNR after 4 steps" in out


def test_the_built_in_practice_plans_with_a_built_in_image(model, tmp_path, monkeypatch, capsys):
    from msmodelslim.cli.__main__ import main

    monkeypatch.setattr("msmodelslim.model.diffusion.dit.DiTFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["quant", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--quant_type", "w8a8", "--dry_run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == LINEARS and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,needle", [
    ({"image": None}, "inference_config.image is missing"),
    ({"image": "no/such/picture.png"}, "not a readable image"),
    ({"image": ["a.png"] * 4}, "give one to three input images"),
    ({"height": 32, "width": None}, "give both height and width"),
    ({"height": 34, "width": 32}, "must be multiples of 4"),
    ({"sample_steps": 3}, "inference_config.sample_steps: unknown key"),
])
def test_bad_sampling_settings_are_refused_before_any_weight(model, sampling, tmp_path, capsys, sampling_calls,
                                                              change, needle):
    settings = {k: v for k, v in {**sampling, **change}.items() if v is not None}
    assert quant(model, tmp_path / "out", write_config(tmp_path / "c.yaml", settings), MODEL_TYPE) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and sampling_calls == []


def test_another_qwen_image_pipeline_is_refused_by_name(model, sampling, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "QwenImageEditPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    assert quant(copy, tmp_path / "out", write_config(tmp_path / "c.yaml", sampling), MODEL_TYPE) == 2
    assert "Qwen-Image-Edit (the first release, one input image)" in capsys.readouterr().err


def test_a_dump_of_another_picture_under_the_same_path_is_refused(model, sampling, tmp_path, capsys,
                                                                   sampling_calls):
    picture = make_picture(tmp_path / "input.png", seed=0)
    settings = {**sampling, "image": str(picture), "prompt": "make the disc blue", "num_inference_steps": 2}
    dump = str(tmp_path / "dump")
    assert quant(model, tmp_path / "a", write_config(tmp_path / "c.yaml", settings, dump_dir=dump), MODEL_TYPE) == 0
    assert len(sampling_calls) == 1
    make_picture(picture, seed=1)  # another picture, same path
    capsys.readouterr()
    assert quant(model, tmp_path / "b", write_config(tmp_path / "c.yaml", settings, dump_dir=dump), MODEL_TYPE) == 2
    err = capsys.readouterr().err
    assert "captured from another model or sampling configuration" in err and "image_digests" in err, err
    assert len(sampling_calls) == 1 and not (tmp_path / "b").exists()
