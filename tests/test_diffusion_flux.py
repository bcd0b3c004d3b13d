"""FLUX.1 W8A8 dynamic end to end on a tiny random diffusers FluxPipeline (multimodal_sd_modelslim_v1): quant ->
ascendv1 (and mindie) DiT + copied components -> format check -> reader -> the quantized pipeline samples; the
walk over both kinds of blocks (dual-stream transformer_blocks, then single_transformer_blocks); refusals by name.

Denoiser error bound (tests/tiny_dit.py): the tiny DiT has L = 2*14 + 2*6 = 40 quantized linears (a dual-stream
block: image and text q/k/v/out, two feed-forwards of two linears, two AdaLN modulations; a single-stream block:
q/k/v, proj_mlp, proj_out, its modulation). sqrt(40)*sqrt(2)*4/(127*sqrt(12)) = 0.081. A wrong scale or layout
gives errors of order 1; an unquantized DiT gives 0, which the test refuses too.
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

from tiny_dit import (CREST_FACTOR, W8A8_DYNAMIC, count_pipeline_calls, int8_bound, make_tiny_flux, quant,
                      write_config)

diffusers = pytest.importorskip("diffusers")

DUAL, SINGLE = 2, 2
LINEARS_DUAL, LINEARS_SINGLE = 14, 6
LINEARS = DUAL * LINEARS_DUAL + SINGLE * LINEARS_SINGLE
SAMPLING = {"prompt": ["a cat holds a sign", "a dog in the snow"], "height": 32, "width": 32,
            "num_inference_steps": 3, "max_sequence_length": 16, "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
RECIPE = Path(__file__).resolve().parent.parent / "msmodelslim" / "model" / "diffusion" / "flux1_w8a8_dynamic.yaml"
MODEL_TYPE = "FLUX.1-dev"


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("flux") / "FLUX.1-tiny")


@pytest.fixture
def sampling_calls(monkeypatch) -> list:
    return count_pipeline_calls(monkeypatch, "FluxPipeline")


@pytest.fixture(scope="module")
def quantized(flux, tmp_path_factory) -> Path:
    """The built-in practice (--quant_type w8a8), with the tiny model's sampling."""
    tmp = tmp_path_factory.mktemp("w8a8")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["spec"]["process"] == [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"]}]
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = SAMPLING
    (tmp / "w8a8.yaml").write_text(yaml.safe_dump(recipe))
    assert quant(flux, tmp / "out", tmp / "w8a8.yaml", MODEL_TYPE) == 0
    return tmp / "out"


def test_w8a8_dynamic_quantizes_both_kinds_of_blocks_and_copies_the_rest(flux, quantized):
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    dit = quantized / "transformer"
    description = json.loads((dit / "quant_model_description.json").read_text())
    weights = sorted(k for k, v in description.items() if k.endswith(".weight") and v == "W8A8_DYNAMIC")
    assert len(weights) == LINEARS
    assert sum(k.startswith("transformer_blocks.") for k in weights) == DUAL * LINEARS_DUAL
    assert sum(k.startswith("single_transformer_blocks.") for k in weights) == SINGLE * LINEARS_SINGLE
    assert "transformer_blocks.0.attn.add_q_proj.weight" in weights
    assert "single_transformer_blocks.1.proj_out.weight" in weights
    assert description["proj_out.weight"] == "FLOAT" and description["x_embedder.weight"] == "FLOAT"
    assert [f for f in check_ascendv1(dit) if f.level == "error"] == []
    for component in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for file in (flux / component).iterdir():
            assert (quantized / component / file.name).read_bytes() == file.read_bytes()
    assert (quantized / "calib_data.pth").is_file() and (quantized / "flux1_best_practice.yaml").is_file()
    dump = torch.load(quantized / "calib_data.pth", weights_only=True)
    # 2 prompts x 3 steps x (conditional, negative): the blocks' keyword arguments captured as positional ones
    assert len(dump["samples"]) == 12 and len(dump["samples"][0]) == 5


def test_the_quantized_pipeline_samples_within_the_int8_bound(flux, quantized):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.model.diffusion import FLUX1

    float_pipe = FLUX1.load_pipeline(flux, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(quantized, FLUX1)  # everything from the output folder alone
    linears = [m for m in quant_pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == LINEARS and {m.scheme.value for m in linears} == {"W8A8_DYNAMIC"}
    sampling = saved_sampling(quantized, FLUX1, steps=4)  # timesteps the 3-step calibration never visited
    report = compare_pipelines(float_pipe, quant_pipe, FLUX1, sampling, ["a red kite above a beach", "a train"])
    print(report.table())
    assert len(report.rel_errors) == 2 * 4 * 2  # prompts x steps x (conditional, negative)
    bound = int8_bound(LINEARS)
    assert 0 < max(report.rel_errors) < bound, report.table()
    assert min(report.cosines) > 1 - bound ** 2 / 2
    assert all(math.isfinite(p) and p > 20 for p in report.latent_psnr_db), report.table()


@torch.no_grad()
def test_each_quantized_block_update_is_within_the_int8_bound(flux, quantized):
    """Each block of both kinds, on the float walk's inputs: its own update of each stream is bounded by the grid
    argument over the block's linears (the float residual stream does not dilute it)."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import FLUX1

    float_dit = FLUX1.load_pipeline(flux, torch.device("cpu")).transformer
    quant_dit = load_quantized_denoiser(quantized / "transformer", FLUX1)
    samples = torch.load(quantized / "calib_data.pth", weights_only=True)["samples"]
    worst = {"transformer_blocks": 0.0, "single_transformer_blocks": 0.0}
    for args in samples:
        for stream in args[:2]:
            crest = stream.abs().amax(-1) / stream.pow(2).mean(-1).sqrt()
            assert float(crest.max()) <= CREST_FACTOR
        for (name, f_block), (_, q_block) in zip(FLUX1.walk(float_dit), FLUX1.walk(quant_dit)):
            f_out, q_out = f_block(*args), q_block(*args)
            kind = name.split(".")[0]
            # outputs are (encoder_hidden_states, hidden_states); inputs (hidden_states, encoder_hidden_states)
            for f_stream, q_stream, x in ((f_out[1], q_out[1], args[0]), (f_out[0], q_out[0], args[1])):
                if not torch.equal(f_stream, x):  # the single-stream block passes the text stream through
                    worst[kind] = max(worst[kind], float((q_stream - f_stream).norm() / (f_stream - x).norm()))
            args = FLUX1.next_inputs(args, f_out)
    print("worst block update errors", worst, int8_bound(LINEARS_DUAL), int8_bound(LINEARS_SINGLE))
    assert 0 < worst["transformer_blocks"] < int8_bound(LINEARS_DUAL), worst
    assert 0 < worst["single_transformer_blocks"] < int8_bound(LINEARS_SINGLE), worst


def test_mindie_format_reads_back_with_the_same_tensors(flux, quantized, tmp_path, sampling_calls):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import FLUX1

    (tmp_path / "dump").mkdir()
    shutil.copyfile(quantized / "calib_data.pth", tmp_path / "dump" / "calib_data.pth")  # reused: no sampling
    config = write_config(tmp_path / "c.yaml", SAMPLING, save=[{"type": "mindie_format_saver", "part_file_size": 0}],
                          dump_dir=str(tmp_path / "dump"))
    assert quant(flux, tmp_path / "out", config, MODEL_TYPE) == 0
    assert sampling_calls == []
    dit = tmp_path / "out" / "transformer"
    assert sorted(p.name for p in dit.iterdir()) == ["config.json", "quant_model_description_w8a8_dynamic.json",
                                                     "quant_model_weight_w8a8_dynamic.safetensors"]
    saved = load_file(str(dit / "quant_model_weight_w8a8_dynamic.safetensors"))
    ascend = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
    assert saved.keys() == ascend.keys() and all(torch.equal(saved[k], ascend[k]) for k in saved)
    model = load_quantized_denoiser(dit, FLUX1)
    assert len(FLUX1.walk(model)) == DUAL + SINGLE


def test_saved_tensors_dequantize_to_the_float_weights_within_half_a_step(flux, quantized):
    source = load_file(str(flux / "transformer" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
    description = json.loads((quantized / "transformer" / "quant_model_description.json").read_text())
    checked = 0
    for name, tag in description.items():
        if tag == "FLOAT" and name in saved:
            assert torch.equal(saved[name], source[name]), name
        elif tag == "W8A8_DYNAMIC" and name.endswith(".weight"):
            prefix = name[: -len(".weight")]
            q, scale = saved[name], saved[f"{prefix}.weight_scale"]
            assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
            error = (q.double() * scale.double() - source[name].double()).abs()
            assert bool((error <= scale.double() / 2 * (1 + 1e-6)).all()), name
            checked += 1
    assert checked == LINEARS


def test_msmodelslim_eval_prints_the_before_after_table(flux, quantized, tmp_path, capsys):
    from msmodelslim.cli.__main__ import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite above a beach\n")
    assert main(["eval", "--model_path", str(flux), "--quant_path", str(quantized), "--dataset", str(prompts),
                 "--max_windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "denoiser relative error, mean" in out and "final-latent PSNR after 4 steps" in out


def test_a_dry_run_plans_both_kinds_of_blocks_and_the_built_in_practice(flux, tmp_path, monkeypatch, capsys):
    from msmodelslim.cli.__main__ import main

    monkeypatch.setattr("msmodelslim.model.diffusion.wan.DiffusionFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    assert quant(flux, tmp_path / "out", write_config(tmp_path / "c.yaml", SAMPLING), MODEL_TYPE, "--dry_run") == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == LINEARS and "  single_transformer_blocks.1." in plan[-1]
    # --quant_type w8a8: flux1_w8a8_dynamic.yaml (1024x1024, 28 steps: planned here, never sampled)
    assert main(["quant", "--model_path", str(flux), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", MODEL_TYPE, "--quant_type", "w8a8", "--dry_run"]) == 0
    assert capsys.readouterr().out.splitlines() == plan


@pytest.mark.parametrize("change,needle", [
    ({"sample_steps": 3}, "inference_config.sample_steps: unknown key (accepted: prompt, num_inference_steps"),
    ({"height": 42}, "must be multiples of 4"),
    ({"prompt": " "}, "give at least one non-empty prompt"),
])
def test_bad_sampling_settings_are_refused_before_any_weight(flux, tmp_path, capsys, sampling_calls, change, needle):
    assert quant(flux, tmp_path / "out", write_config(tmp_path / "c.yaml", {**SAMPLING, **change}), MODEL_TYPE) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and sampling_calls == []


@pytest.mark.parametrize("edit,needle", [
    (lambda index: index.update(_class_name="FluxKontextPipeline"), "FLUX.1 Kontext"),
    (lambda index: index.update(_class_name="WanPipeline"), "needs a diffusers FluxPipeline"),
    (lambda index: index.update(text_encoder_2=["my_module", "MyT5"]), "nothing from the model folder is run"),
])
def test_other_pipelines_are_refused_by_name(flux, tmp_path, capsys, edit, needle):
    copy = tmp_path / "model"
    shutil.copytree(flux, copy)
    index = json.loads((copy / "model_index.json").read_text())
    edit(index)
    (copy / "model_index.json").write_text(json.dumps(index))
    assert quant(copy, tmp_path / "out", write_config(tmp_path / "c.yaml", SAMPLING), MODEL_TYPE) == 2
    assert needle in capsys.readouterr().err


def test_w8a8_static_ranges_come_from_the_walk_over_both_kinds_of_blocks(flux, quantized, tmp_path):
    """A calibrating recipe: each block is calibrated on the previous block's outputs, dual-stream into
    single-stream. Every linear's static input scale equals the one from the float pipeline's own sampling."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import FLUX1
    from tiny_dit import W8A8_STATIC, reference_input_scales

    (tmp_path / "dump").mkdir()
    shutil.copyfile(quantized / "calib_data.pth", tmp_path / "dump" / "calib_data.pth")
    config = write_config(tmp_path / "c.yaml", SAMPLING, process=[{"type": "linear_quant", "qconfig": W8A8_STATIC}],
                          save=[{"type": "mindie_format_saver", "part_file_size": 0}], dump_dir=str(tmp_path / "dump"))
    assert quant(flux, tmp_path / "out", config, MODEL_TYPE) == 0
    dit = load_quantized_denoiser(tmp_path / "out" / "transformer", FLUX1)
    expected = reference_input_scales(FLUX1.load_pipeline(flux, torch.device("cpu")), FLUX1,
                                      FLUX1.inference_config(SAMPLING, "test"))
    got = {f"{name}.{child}": float(m.input_scale) for name, block in FLUX1.walk(dit)
           for child, m in block.named_modules() if getattr(m, "input_scale", None) is not None}
    assert got.keys() == expected.keys() and len(got) == LINEARS
    worst = max(abs(got[k] / expected[k] - 1) for k in got)
    assert worst < 1e-4, worst


def test_without_model_type_a_flux_pipeline_folder_is_recognised(flux, tmp_path, capsys):
    from msmodelslim.cli.__main__ import main

    config = write_config(tmp_path / "c.yaml", SAMPLING)
    assert main(["quant", "--model_path", str(flux), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--config_path", str(config), "--dry_run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == LINEARS


def test_keyword_calls_are_captured_as_positional_arguments_in_parameter_order():
    """capture_mode 'args': FLUX.1 calls its blocks with keywords; the dump keeps them in the forward's parameter
    order with defaults filled in, so that block(*args) replays the call. A keyword-only parameter cannot be."""
    from msmodelslim.core.errors import InvalidDatasetError
    from msmodelslim.core.sd_calibration import positional_arguments

    class Block(torch.nn.Module):
        def forward(self, hidden, context, temb, rope=None, extra=None):
            return hidden

    class KeywordOnly(torch.nn.Module):
        def forward(self, hidden, *, scale=1.0):
            return hidden

    h, c, t = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    assert positional_arguments(Block(), (), {"temb": t, "context": c, "hidden": h}) == (h, c, t, None, None)
    assert positional_arguments(Block(), (h,), {"context": c, "temb": t, "rope": "r"}) == (h, c, t, "r", None)
    assert positional_arguments(Block(), (h, c, t), {}) == (h, c, t)
    with pytest.raises(InvalidDatasetError, match="keyword-only arguments \\['scale'\\]"):
        positional_arguments(KeywordOnly(), (h,), {"scale": 2.0})


def test_row_parallel_linears_are_matched_by_whole_name_parts():
    """One rule for the text families (ModelStructure.is_row_parallel) and the DiT families: a suffix matches
    whole dotted name parts, so that FLUX's `ff.net.2` is not taken for a module whose name only ends in it."""
    from msmodelslim.model.diffusion.dit import is_row_parallel
    from msmodelslim.model.diffusion.flux import FLUX1
    from msmodelslim.model.interface import ModelStructure

    assert is_row_parallel(FLUX1, "transformer_blocks.0.ff.net.2")
    assert is_row_parallel(FLUX1, "single_transformer_blocks.3.proj_out")
    assert not is_row_parallel(FLUX1, "transformer_blocks.0.ff_context.net.0.proj")
    assert not is_row_parallel(FLUX1, "transformer_blocks.0.xff.net.2")
    assert not is_row_parallel(FLUX1, "single_transformer_blocks.3.norm.proj_out_gate")
    structure = ModelStructure()
    assert structure.is_row_parallel("model.layers.0.self_attn.o_proj")
    assert not structure.is_row_parallel("model.layers.0.self_attn.q_proj")
    assert not structure.is_row_parallel("model.layers.0.self_attn.xo_proj")
