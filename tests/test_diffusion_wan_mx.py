"""The Wan2.2 MX recipes of protocol.md §3.4 (wan2_2_w8a8f8_mxfp_{t2v,ti2v}, wan2_2_w4a4f8_mxfp_t2v,
wan2_2_w4a4f4_mxfp_t2v) end to end on tiny random diffusers pipelines: each row written as a config by
tests/upstream_recipes.py, quantized (MX linears, online_quarot on every attention's Q/K, FA3 on Q/K/V), the
written DiT checked, read back, and the quantized pipeline sampled; denoiser relative error and final-latent PSNR
are printed per row. Also: online_quarot is exact in float, its matrices are the normalized Hadamard ones, and the
quantized error is measured with and without it.

How the rows are read for a diffusers Wan DiT (the builder writes them for text models):
- the row's `dataset` (wan2_2_t2v / wan2_2_ti2v) is the prompt set in lab_calib/ (core/sd_dataset.py); the
  sampling settings are the tiny pipeline's (64*64, 5 frames, 3 steps), and `enable_dump: false` as in upstream's
  Wan2.2 recipes (everything here is dynamic: no sampling at all);
- two linear schemes: the builder gives the second one the attention linears (`*self_attn*`), which a diffusers
  WanTransformerBlock calls attn1/attn2, so it becomes `*attn*` (MXFP8 mse_round on attention, MXFP4 ceil_x on
  the FFN);
- w4a4f4's two FA3 entries (FP8 per token, MXFP4 per block) become one fa3_quant step with details: Q FP8 per
  token, K and V MXFP4 per block (quant_type "Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC").
The tiny DiTs have head_dim 32 (one MX block per head) and 64/128-wide linears (two and four MX blocks).

Bounds, as tests/test_diffusion_wan.py derives the int8 one (errors of the quantized linears adding in
quadrature, no credit for the float residual stream that dilutes them): an element rounded to a float grid with
m mantissa bits has a relative error uniform up to 2^-(m+1), RMS 2^-(m+1)/sqrt(3) (MX's shared exponent keeps each
element within its own binade's grid): 0.036 for E4M3 (m = 3), 0.144 for E2M1 (m = 1). A linear rounds both
operands: sqrt(2) times that. The tiny DiT's 20 linears all MXFP8: sqrt(20) * 0.051 = 0.23, bound 0.25 for the
8-bit rows; 16 MXFP8 + 4 MXFP4 (the FFN): sqrt(16 * 0.051^2 + 4 * 0.204^2) = 0.45, bound 0.5 for the 4-bit rows
(FA3 adds one more rounding of Q/K/V per attention, inside these margins). A wrong layout or scale gives errors of
order 1; an unquantized DiT exactly 0, which the tests refuse too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from msmodelslim.cli.__main__ import main
from test_diffusion_wan import SAMPLING, make_tiny_wan
from upstream_recipes import ROWS, config_of

diffusers = pytest.importorskip("diffusers")

BOUNDARY = 0.9
HEAD_DIM = 32
ROW_FILES = {"wan2_2/wan2_2_w8a8f8_mxfp_t2v.yaml": "t2v", "wan2_2/wan2_2_w4a4f8_mxfp_t2v.yaml": "t2v",
             "wan2_2/wan2_2_w4a4f4_mxfp_t2v.yaml": "t2v", "wan2_2/wan2_2_w8a8f8_mxfp_ti2v.yaml": "ti2v",
             "wan2_2/wan2_2_w8a8f8_mxfp_i2v.yaml": "i2v"}
MODEL_TYPE = {"t2v": "Wan2.2-T2V-A14B", "ti2v": "Wan2.2-TI2V-5B", "i2v": "Wan2.2-I2V-A14B"}
TASK = {"t2v": "t2v-A14B", "ti2v": "ti2v-5B", "i2v": "i2v-A14B"}
EXPERTS = {"t2v": ("high_noise_model", "low_noise_model"), "ti2v": ("transformer",),
           "i2v": ("high_noise_model", "low_noise_model")}
TINY_SAMPLING = {k: v for k, v in SAMPLING.items() if k != "prompt"}  # the prompts come from the row's dataset
FP8_PER_TOKEN = {"dtype": "fp8_e4m3", "scope": "per_token", "symmetric": True, "method": "minmax"}
MXFP4_BLOCK = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
LINEARS = 20  # per tiny DiT: 2 blocks x (attn1 q/k/v/out, attn2 q/k/v/out, ffn up/down)
ATTENTIONS = 4  # per tiny DiT: 2 blocks x (attn1, attn2)
HELD_OUT = ["a red kite above a beach"]


def row(file: str):
    return next(r for r in ROWS if r.file == file)


def dit_config(file: str) -> dict:
    """The row's config (upstream_recipes.config_of) read for a diffusers Wan DiT (the module docstring)."""
    recipe = config_of(row(file), False)
    spec = recipe["spec"]
    for step in spec["process"]:
        for key in ("include", "exclude"):
            if key in step:
                step[key] = [p.replace("*self_attn*", "*attn*") for p in step[key]]
        if step["type"] == "fa3_quant" and "FA3:mxfp4/per_block" in row(file).schemes:
            step.pop("qconfig")
            step["details"] = {"fa_q": FP8_PER_TOKEN, "fa_k": MXFP4_BLOCK, "fa_v": MXFP4_BLOCK}
    kind = ROW_FILES[file]
    spec["multimodal_sd_config"] = {"dump_config": {"enable_dump": False},
                                    "inference_config": {**TINY_SAMPLING, "task": TASK[kind]}}
    return recipe


def quant(model: Path, out: Path, config: dict, model_type: str, tmp: Path, *extra: str) -> int:
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", model_type, "--config_path", str(path), *extra])


def make_tiny_wan_i2v(path: Path) -> Path:
    """Wan2.2-I2V-A14B's layout as diffusers saves it: a WanImageToVideoPipeline with two random DiTs reading
    16 noisy + 4 mask + 16 image-latent channels, boundary_ratio, no image encoder; the tiny Wan's other parts."""
    t2v = diffusers.WanPipeline.from_pretrained(make_tiny_wan(path.parent / f"{path.name}_t2v", head_dim=HEAD_DIM))
    torch.manual_seed(1)

    def dit():
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    diffusers.WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                      scheduler=t2v.scheduler, transformer=dit(), transformer_2=dit(),
                                      boundary_ratio=BOUNDARY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_mx")
    return {"t2v": make_tiny_wan(root / "Wan2.2-T2V-tiny", boundary_ratio=BOUNDARY, head_dim=HEAD_DIM),
            "ti2v": make_tiny_wan(root / "Wan2.2-TI2V-tiny", ti2v=True, head_dim=HEAD_DIM),
            "i2v": make_tiny_wan_i2v(root / "Wan2.2-I2V-tiny")}


def family_of(kind: str):
    from msmodelslim.model.diffusion import WAN2_2_I2V, WAN2_2_T2V, WAN2_2_TI2V

    return {"t2v": WAN2_2_T2V, "ti2v": WAN2_2_TI2V, "i2v": WAN2_2_I2V}[kind]


def evaluate(model: Path, out: Path, kind: str):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline

    family = family_of(kind)
    float_pipe = family.load_pipeline(model, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(out, family)  # from the output folder alone
    return compare_pipelines(float_pipe, quant_pipe, family, saved_sampling(out, family, steps=4), HELD_OUT), quant_pipe


@pytest.mark.parametrize("file", list(ROW_FILES))
def test_the_row_runs_end_to_end(file, pipelines, tmp_path, sampling_calls, capsys):
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.ir.fa3 import FA3DynamicQuant
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.processor.online_quarot.rotation import OnlineRotation

    kind = ROW_FILES[file]
    config = dit_config(file)
    assert [s["type"] for s in config["spec"]["process"]][-2:] == ["online_quarot", "fa3_quant"]
    assert config["spec"]["dataset"] == f"wan2_2_{kind}"
    out = tmp_path / "out"
    assert quant(pipelines[kind], out, config, MODEL_TYPE[kind], tmp_path) == 0, capsys.readouterr().err
    assert sampling_calls == []  # every step is dynamic and enable_dump is false: nothing sampled
    fa3 = next(s for s in config["spec"]["process"] if s["type"] == "fa3_quant")
    quant_type = "Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC" if "details" in fa3 else "FP8_DYNAMIC"
    for expert in EXPERTS[kind]:
        dit = pipelines[kind] / ("transformer" if expert == "high_noise_model" else
                                 "transformer_2" if expert == "low_noise_model" else expert)
        folder = out / expert
        description = json.loads((folder / "quant_model_description.json").read_text())
        weights = {k: v for k, v in description.items() if k.endswith(".weight") and v != "FLOAT"}
        assert all(k.startswith("blocks.") for k in weights)  # outside the blocks nothing is quantized
        types = set(weights.values())
        if "w4a4" in file:  # attention MXFP8, FFN MXFP4
            assert types == {"W8A8_MXFP8", "W4A4_MXFP4"}, types
            assert all(v == ("W4A4_MXFP4" if ".ffn." in k else "W8A8_MXFP8") for k, v in weights.items())
            assert description["model_quant_type"] == "W4A4_MXFP4"
        else:
            assert types == {"W8A8_MXFP8"} and description["model_quant_type"] == "W8A8_MXFP8"
        assert len(weights) == LINEARS and description["group_size"] == 32
        rotations = [k for k in description if k.endswith(("q_rot", "k_rot"))]
        assert len(rotations) == 2 * ATTENTIONS and all(description[k] == "FLOAT" for k in rotations)
        assert [k for k in description if k.endswith(".quant_type")] == [
            f"blocks.{b}.{a}.quant_type" for b in (0, 1) for a in ("attn1", "attn2")]
        assert {description[f"blocks.{b}.{a}.quant_type"] for b in (0, 1) for a in ("attn1", "attn2")} == {quant_type}
        assert [f for f in check_ascendv1(folder) if f.level == "error"] == []
        assert json.loads((folder / "config.json").read_text()) == json.loads((dit / "config.json").read_text())
    report, quant_pipe = evaluate(pipelines[kind], out, kind)
    for dit in [getattr(quant_pipe, e) for e in ("transformer", "transformer_2") if getattr(quant_pipe, e, None)]:
        assert sum(isinstance(m, QuantLinear) for m in dit.modules()) == LINEARS
        assert sum(isinstance(m, OnlineRotation) for m in dit.modules()) == 2 * ATTENTIONS
        assert sum(isinstance(m, FA3DynamicQuant) for m in dit.modules()) == 3 * ATTENTIONS
    print(f"\n{file}\n{report.table()}")
    bound = 0.5 if "w4a4" in file else 0.25
    assert 0 < max(report.rel_errors) < bound, report.table()
    assert all(p > (10 if "w4a4" in file else 25) for p in report.latent_psnr_db), report.table()


# ---- online_quarot: the rotation, exact in float -----------------------------------------------------------------
def sylvester(n: int) -> torch.Tensor:
    """The obviously correct reference: H_1 = [1], H_2m = [[H, H], [H, -H]], entries h_ij = (-1)^popcount(i & j)."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("size,block", [(32, -1), (128, -1), (32, 8), (64, 16)])
def test_rotation_is_the_normalized_hadamard_matrix(size, block):
    from msmodelslim.processor.online_quarot.rotation import rotation_matrix

    r = rotation_matrix(size, block)
    order = size if block < 0 else block
    expected = torch.block_diag(*[sylvester(order) / order ** 0.5] * (size // order))
    assert torch.allclose(r, expected, atol=1e-12)
    assert torch.allclose(r @ r.T, torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_rotation_sizes_without_a_hadamard_matrix_are_refused():
    from msmodelslim.processor.online_quarot.rotation import rotation_matrix

    with pytest.raises(ValueError, match="no Hadamard matrix of order 6"):  # none exists (orders are 1, 2, 4k)
        rotation_matrix(6)
    with pytest.raises(ValueError, match="does not divide"):
        rotation_matrix(48, 32)


def test_rotating_q_and_k_leaves_the_scores_unchanged():
    from msmodelslim.processor.online_quarot.rotation import OnlineRotation, rotation_matrix

    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 3, 32), torch.randn(2, 9, 3, 32)
    rotate = OnlineRotation(rotation_matrix(32))
    rq, rk = rotate(q), rotate(k)
    reference = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    assert torch.allclose(torch.einsum("bqhd,bkhd->bhqk", rq.double(), rk.double()), reference, atol=1e-4)
    assert not torch.allclose(rq, q, atol=1e-2)  # the rotation did change Q
    # an outlier coordinate is spread evenly over the head
    spike = torch.zeros(32)
    spike[5] = 8.0
    assert torch.allclose(rotate(spike).abs(), torch.full((32,), 8.0 / 32 ** 0.5), atol=1e-6)


def test_online_quarot_alone_is_exact_in_float(pipelines, tmp_path):
    """The rotated DiT, read back with its q_rot/k_rot, gives the float DiT's outputs (float32 rounding only)."""
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": [{"type": "online_quarot"}], "save": [{"type": "mindie_format_saver",
                                                                          "part_file_size": 0}],
                       "multimodal_sd_config": {"dump_config": {"enable_dump": False},
                                                "inference_config": {**SAMPLING, "task": TASK["t2v"]}}}}
    out = tmp_path / "rotated"
    assert quant(pipelines["t2v"], out, config, MODEL_TYPE["t2v"], tmp_path) == 0
    description = json.loads(next((out / "high_noise_model").glob("quant_model_description*.json")).read_text())
    assert description["model_quant_type"] == "FLOAT"
    from safetensors.torch import load_file

    saved = load_file(str(next((out / "high_noise_model").glob("quant_model_weight*.safetensors"))))
    assert torch.allclose(saved["blocks.1.attn2.k_rot"].double(), sylvester(HEAD_DIM) / HEAD_DIM ** 0.5, atol=1e-7)
    report, _ = evaluate(pipelines["t2v"], out, "t2v")
    print(f"\nonline_quarot alone: max relative error {max(report.rel_errors):.3g}")
    assert max(report.rel_errors) < 1e-5, report.table()


def test_quantized_attention_error_with_and_without_the_rotation(pipelines, tmp_path):
    """FA3 (Q FP8 per token, K/V MXFP4 per block) on the attention only, with and without online_quarot before it:
    both are reported; each is a real quantization error (neither 0 nor of order 1)."""
    def config(rotate: bool) -> dict:
        fa3 = {"type": "fa3_quant", "details": {"fa_q": FP8_PER_TOKEN, "fa_k": MXFP4_BLOCK, "fa_v": MXFP4_BLOCK}}
        return {"apiversion": "multimodal_sd_modelslim_v1",
                "spec": {"process": ([{"type": "online_quarot"}] if rotate else []) + [fa3],
                         "multimodal_sd_config": {"dump_config": {"enable_dump": False},
                                                  "inference_config": {**SAMPLING, "task": TASK["t2v"]}}}}

    errors = {}
    for rotate in (False, True):
        out = tmp_path / f"fa3_rotated_{rotate}"
        assert quant(pipelines["t2v"], out, config(rotate), MODEL_TYPE["t2v"], tmp_path) == 0
        report, _ = evaluate(pipelines["t2v"], out, "t2v")
        errors[rotate] = (sum(report.rel_errors) / len(report.rel_errors), min(report.latent_psnr_db))
    print(f"\nFA3 Q fp8 / KV mxfp4: mean denoiser relative error, min latent PSNR: without online_quarot "
          f"{errors[False][0]:.4g}, {errors[False][1]:.2f} dB; with {errors[True][0]:.4g}, {errors[True][1]:.2f} dB")
    assert all(0 < e < 0.5 for e, _ in errors.values())


# ---- refusals and the upstream recipe's own names ----------------------------------------------------------------
def test_mindie_refuses_w4a8_mxfp_in_favour_of_ascendv1(pipelines, tmp_path, capsys):
    mx8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
    config = dit_config("wan2_2/wan2_2_w8a8f8_mxfp_t2v.yaml")
    config["spec"]["process"][0]["qconfig"] = {"act": mx8, "weight": {**MXFP4_BLOCK, "method": "ceil_x"}}
    config["spec"]["save"] = [{"type": "mindie_format_saver", "part_file_size": 0}]
    assert quant(pipelines["t2v"], tmp_path / "out", config, MODEL_TYPE["t2v"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "mindie_format_saver does not write W4A8_MXFP" in err and "ascendv1_saver" in err, err
    assert not (tmp_path / "out").exists()


def test_the_upstream_recipe_names_select_the_self_attentions(pipelines, tmp_path, capsys):
    """Upstream's Wan2.2 w8a8f8 recipe, as written there (Wan repository names self_attn / cross_attn, blocks.0
    left out, mindie_format_saver): online_quarot and FA3 reach the self-attentions of blocks 1.. only."""
    mx8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
    process = [{"type": "linear_quant", "qconfig": {"act": mx8, "weight": {**mx8, "method": "mse_round"}},
                "include": ["*"]},
               {"type": "online_quarot", "include": ["*.self_attn.*"], "exclude": ["*blocks.0.self_attn*"]},
               {"type": "fa3_quant", "qconfig": FP8_PER_TOKEN, "include": ["*self_attn"],
                "exclude": ["*blocks.0.self_attn*"]}]
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": process, "dataset": "wan2_2_t2v",
                       "save": [{"type": "mindie_format_saver", "part_file_size": 0}],
                       "multimodal_sd_config": {"dump_config": {"enable_dump": False, "capture_mode": "args",
                                                                "dump_data_dir": ""},
                                                "inference_config": {**TINY_SAMPLING, "task": TASK["t2v"]}}}}
    out = tmp_path / "out"
    assert quant(pipelines["t2v"], out, config, MODEL_TYPE["t2v"], tmp_path) == 0
    for expert in EXPERTS["t2v"]:
        files = sorted(p.name for p in (out / expert).iterdir())
        assert files == ["config.json", "quant_model_description_w8a8_mxfp8.json",
                         "quant_model_weight_w8a8_mxfp8.safetensors"], files
        description = json.loads((out / expert / "quant_model_description_w8a8_mxfp8.json").read_text())
        assert [k for k in description if k.endswith(("_rot", ".quant_type"))] == [
            "blocks.1.attn1.q_rot", "blocks.1.attn1.k_rot", "blocks.1.attn1.quant_type"]
    report, _ = evaluate(pipelines["t2v"], out, "t2v")
    print(f"\nupstream w8a8f8 t2v recipe (mindie)\n{report.table()}")
    assert 0 < max(report.rel_errors) < 0.25


@pytest.mark.parametrize("change,needle", [
    ({"process": [{"type": "online_quarot", "block_size": 12}]}, "block_size must be -1"),
    ({"process": [{"type": "online_quarot", "block_size": 64}]}, "block_size 64 does not divide"),
    ({"process": [{"type": "fa3_quant", "qconfig": MXFP4_BLOCK}]}, "not a multiple of the MX block 32"),
    ({"dataset": "no_such_prompts"}, "dataset 'no_such_prompts' not found"),
    ({"dataset": "wan2_2_t2v", "prompt": "a cat"}, "spec.dataset and multimodal_sd_config.inference_config.prompt"),
    ({"dataset": "wan2_2_i2v"}, "image-conditioned sampling is not supported by this family"),
])
def test_what_cannot_run_is_refused_before_any_weight(tmp_path, monkeypatch, capsys, change, needle):
    """On a tiny Wan2.2 with head_dim 16 (a rotation of 64 cannot fit, nor an MX block of 32)."""
    monkeypatch.setattr("msmodelslim.model.diffusion.wan.DiffusionFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    model = make_tiny_wan(tmp_path / "wan", boundary_ratio=BOUNDARY)
    sampling = {**SAMPLING, "task": TASK["t2v"]}
    spec: dict = {"process": change.get("process", [{"type": "online_quarot"}]),
                  "multimodal_sd_config": {"inference_config": sampling}}
    if "dataset" in change:
        spec["dataset"] = change["dataset"]
        if "prompt" not in change:
            sampling.pop("prompt")
    config = {"apiversion": "multimodal_sd_modelslim_v1", "spec": spec}
    assert quant(model, tmp_path / "out", config, MODEL_TYPE["t2v"], tmp_path) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---- static FA3 (int8 per head) on a DiT: calibrated on the sampled denoiser inputs --------------------------------
def test_static_int8_fa3_is_calibrated_saved_for_mindie_and_read_back(tmp_path, capsys):
    """fa3_quant's default (int8, one scale per head, minmax) on a tiny Wan2.1: the scales come from the captured
    DiT inputs; MindIE gets `<attn>.fa_{q,k,v}.scale/offset` (FAQuant), `fa_quant_type: FAKQuant` and
    `<attn>.quant_type: INT8`; the reader rebuilds FA3HeadQuant, whose scales are max|x_h| / 127 of what the float
    attention hands its kernel (checked against Q/K/V recorded from the float DiT on the same inputs)."""
    from safetensors.torch import load_file

    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.ir.fa3 import FA3HeadQuant
    from msmodelslim.model.diffusion import WAN2_1
    from msmodelslim.model.diffusion.attention import set_slot

    model = make_tiny_wan(tmp_path / "wan21")
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": [{"type": "fa3_quant"}],
                       "save": [{"type": "mindie_format_saver", "part_file_size": 0}],
                       "multimodal_sd_config": {"inference_config": SAMPLING}}}
    out = tmp_path / "out"
    assert quant(model, out, config, "Wan2.1", tmp_path) == 0, capsys.readouterr().err
    folder = out / "transformer"
    description = json.loads((folder / "quant_model_description.json").read_text())  # no quantized linear: no suffix
    assert description["fa_quant_type"] == "FAKQuant" and description["blocks.0.attn2.quant_type"] == "INT8"
    saved = load_file(str(folder / "quant_model_weight.safetensors"))
    assert saved["blocks.1.attn1.fa_k.scale"].shape == (2, 1) and description["blocks.1.attn1.fa_k.scale"] == "FAQuant"
    # reference: the float DiT on the calibration inputs, Q/K/V recorded where the kernel reads them
    samples = torch.load(out / "calib_data.pth", weights_only=True)["samples"]
    float_dit = WAN2_1.load_pipeline(model, torch.device("cpu")).transformer
    seen: dict[str, list] = {}

    class Record(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x):  # [batch, heads, tokens, dim]
            seen.setdefault(self.key, []).append(x.abs().amax(dim=(0, 2, 3)))
            return x

    for b, block in enumerate(float_dit.blocks):
        for a in ("attn1", "attn2"):
            for branch in ("fa_q", "fa_k", "fa_v"):
                set_slot(getattr(block, a), branch, Record(f"blocks.{b}.{a}.{branch}"))
    with torch.no_grad():
        for hidden, *rest in samples:
            for block in float_dit.blocks:
                hidden = block(hidden, *rest)
    quant_dit = load_quantized_denoiser(folder, WAN2_1)
    for key, maxima in seen.items():
        block, attention, branch = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1], key.rsplit(".", 1)[1]
        module = getattr(quant_dit.get_submodule(block).get_submodule(attention), branch)
        assert isinstance(module, FA3HeadQuant)
        expected = torch.stack(maxima).amax(dim=0) / 127
        assert torch.allclose(module.scale.flatten(), expected, rtol=1e-5), key


# ---- Wan2.2-I2V-A14B: calibration sampling from the conditioning image ----------------------------------------------
def test_i2v_calibrates_each_expert_on_samples_from_the_datasets_image(pipelines, tmp_path, monkeypatch):
    """A calibrating recipe (static int8 FA3) on the tiny I2V pipeline with `dataset: wan2_2_i2v`: the float
    WanImageToVideoPipeline samples the set's prompt from its image (checked: the pipeline got that image), each
    expert's dump holds its own steps, and the saved practice keeps the image for `msmodelslim eval`."""
    images = []
    original = diffusers.WanImageToVideoPipeline.__call__

    def spy(self, *args, **kwargs):
        images.append(kwargs.get("image"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.WanImageToVideoPipeline, "__call__", spy)
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": [{"type": "fa3_quant"}], "dataset": "wan2_2_i2v",
                       "multimodal_sd_config": {"inference_config": {**TINY_SAMPLING, "task": TASK["i2v"]}}}}
    out = tmp_path / "out"
    assert quant(pipelines["i2v"], out, config, MODEL_TYPE["i2v"], tmp_path) == 0
    from msmodelslim.core.dataset import LAB_CALIB
    from PIL import Image

    with Image.open(LAB_CALIB / "wan2_2_i2v" / "i2v_input.png") as reference:
        assert len(images) == 1 and torch.equal(torch.tensor(np.asarray(images[0])),
                                                torch.tensor(np.asarray(reference.convert("RGB"))))
    for expert in EXPERTS["i2v"]:
        dump = torch.load(out / f"calib_data_{TASK['i2v']}_{expert}.pth", weights_only=True)
        assert dump["samples"] and dump["fingerprint"]["sampling"]["image"].endswith("i2v_input.png")
        description = json.loads((out / expert / "quant_model_description.json").read_text())
        assert description["fa_quant_type"] == "FAKQuant"
    practice = yaml.safe_load((out / "wan2_2_i2v_best_practice.yaml").read_text())
    assert practice["spec"]["multimodal_sd_config"]["inference_config"]["image"].endswith("i2v_input.png")
    images.clear()
    report, _ = evaluate(pipelines["i2v"], out, "i2v")
    assert images and all(i is not None for i in images)
    print(f"\nI2V static int8 FA3\n{report.table()}")
    assert 0 < max(report.rel_errors) < 0.1


# ---- the Q/K/V tap on a diffusers attention -----------------------------------------------------------------------
class _NoDispatchProcessor:  # this test module has no dispatch_attention_fn: nothing to route through
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_the_tap_routes_qkv_restores_the_dispatch_and_refuses_other_processors():
    import sys

    from diffusers.models.transformers import transformer_wan

    from msmodelslim.core.errors import UnsupportedError
    from msmodelslim.model.diffusion.attention import check_tappable, set_slot

    torch.manual_seed(0)
    attention = transformer_wan.WanAttention(dim=64, heads=2, dim_head=32,
                                             processor=transformer_wan.WanAttnProcessor())
    x = torch.randn(1, 5, 64)
    reference = attention(x)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, t):  # [batch, heads, tokens, dim] for the FA3 slots
            seen.append(tuple(t.shape))
            return t * 0  # V zeroed: the attention's output is its to_out bias alone

    set_slot(attention, "fa_v", Spy())
    original = transformer_wan.dispatch_attention_fn
    out = attention(x)
    assert seen == [(1, 2, 5, 32)] and transformer_wan.dispatch_attention_fn is original
    assert torch.allclose(out, attention.to_out[0].bias.expand_as(out), atol=1e-6)
    assert not torch.allclose(reference, out)
    with pytest.raises(RuntimeError):
        set_slot(attention, "fa_v", torch.nn.Linear(3, 3))  # a failing child: the dispatch is restored all the same
        attention(x)
    assert transformer_wan.dispatch_attention_fn is original
    other = transformer_wan.WanAttention(dim=64, heads=2, dim_head=32)
    other.set_processor(_NoDispatchProcessor())
    assert not hasattr(sys.modules[__name__], "dispatch_attention_fn")
    with pytest.raises(UnsupportedError, match="does not call diffusers' dispatch_attention_fn"):
        check_tappable("blocks.0.attn1", other)


def test_a_tapped_legacy_attention_still_gets_its_keywords():
    """diffusers' legacy Attention passes a processor only the keywords its __call__ names: tapped, HunyuanVideo's
    joint attention still receives image_rotary_emb (outputs equal the untapped ones; without RoPE they differ)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers import transformer_hunyuan_video

    from msmodelslim.model.diffusion.attention import install_qkv_tap

    def attention():
        torch.manual_seed(0)
        return Attention(query_dim=64, heads=2, dim_head=32, added_kv_proj_dim=64, bias=True, qk_norm="rms_norm",
                         context_pre_only=False, processor=transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0())

    plain, tapped = attention(), attention()
    install_qkv_tap(tapped)
    x, context, rope = torch.randn(1, 6, 64), torch.randn(1, 3, 64), (torch.randn(6, 32), torch.randn(6, 32))
    for a, b in zip(plain(x, context, image_rotary_emb=rope), tapped(x, context, image_rotary_emb=rope)):
        assert torch.equal(a, b)
    assert not torch.allclose(plain(x, context)[0], tapped(x, context, image_rotary_emb=rope)[0])


@pytest.mark.parametrize("file,weight_type", [("wan2_2/wan2_2_w4a4f4_mxfp_t2v.yaml", "w4a4_mxfp4"),
                                              ("dualscale", "w4a4_mxfp4_dualscale")])
def test_mindie_writes_the_mx_types_it_supports_and_they_read_back(pipelines, tmp_path, file, weight_type):
    """mindie_format_saver (upstream's Wan2.2 recipes save with it): W4A4_MXFP4 + W8A8_MXFP8 with FA3 and the
    rotations (model_quant_type: the last quantized layer's, blocks.1.ffn.net.2), and W4A4_MXFP4_DUALSCALE."""
    from msmodelslim.ir.quant_linear import QuantLinear

    if file == "dualscale":
        dual = {"dtype": "mxfp4", "scope": "dual_scale", "symmetric": True, "method": "dualscale",
                "ext": {"dual_block_size": 64}}
        config = dit_config("wan2_2/wan2_2_w8a8f8_mxfp_t2v.yaml")
        config["spec"]["process"][0]["qconfig"] = {"act": dual, "weight": dual}
    else:
        config = dit_config(file)
    config["spec"]["save"] = [{"type": "mindie_format_saver", "part_file_size": 0}]
    out = tmp_path / "out"
    assert quant(pipelines["t2v"], out, config, MODEL_TYPE["t2v"], tmp_path) == 0
    for expert in EXPERTS["t2v"]:
        names = sorted(p.name for p in (out / expert).iterdir())
        assert names == ["config.json", f"quant_model_description_{weight_type}.json",
                         f"quant_model_weight_{weight_type}.safetensors"], names
        description = json.loads((out / expert / names[1]).read_text())
        assert "version" not in description and "group_size" not in description
        assert description["blocks.1.attn1.q_rot"] == "FLOAT" and "blocks.1.attn2.quant_type" in description
    report, quant_pipe = evaluate(pipelines["t2v"], out, "t2v")
    assert {m.scheme.value for m in quant_pipe.transformer.modules() if isinstance(m, QuantLinear)} == (
        {"W4A4_MXFP4_DUALSCALE"} if file == "dualscale" else {"W4A4_MXFP4", "W8A8_MXFP8"})
    print(f"\nmindie {weight_type}\n{report.table()}")
    assert 0 < max(report.rel_errors) < 0.5


def test_int8_per_token_fa3_writes_the_string_alone_and_serves_float_attention(pipelines, tmp_path):
    """As on the text models: INT8_DYNAMIC is written, no engine reads it, the read-back attention stays float."""
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": [{"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_token"}}],
                       "multimodal_sd_config": {"dump_config": {"enable_dump": False},
                                                "inference_config": {**SAMPLING, "task": TASK["ti2v"]}}}}
    out = tmp_path / "out"
    assert quant(pipelines["ti2v"], out, config, MODEL_TYPE["ti2v"], tmp_path) == 0
    description = json.loads((out / "transformer" / "quant_model_description.json").read_text())
    assert description["blocks.0.attn1.quant_type"] == "INT8_DYNAMIC" and "fa_quant_type" not in description
    report, quant_pipe = evaluate(pipelines["ti2v"], out, "ti2v")
    assert getattr(quant_pipe.transformer.blocks[0].attn1, "fa_q", None) is None
    assert max(report.rel_errors) < 1e-6
