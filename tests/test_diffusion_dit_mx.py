"""The MX recipes of protocol.md §3.4 for FLUX.1, HunyuanVideo and Qwen-Image-Edit-2509 (flux1_w8a8f8_mxfp,
hunyuan_video_w8a8f8_mxfp, qwen-image-edit-w8a8f8-mxfp, qwen-image-edit-w4a4f4-mxfp) end to end on tiny random
diffusers pipelines (tests/tiny_dit.py): each row written as a config by tests/upstream_recipes.py, quantized (MX
linears in both kinds of blocks, online_quarot on every joint attention's Q/K, FA3 on Q/K/V), the written DiT
checked, read back, and the quantized pipeline sampled; denoiser relative error and final-latent PSNR are printed.
online_quarot alone is exact in float in every family: HunyuanVideo's and Qwen-Image's attentions are diffusers'
`Attention`, which hands image_rotary_emb and the masks to its processor only when the processor's __call__ names
them, so the Q/K/V tap must carry the processor's signature (without it, online_quarot alone gave a 3.3% error on
the tiny HunyuanVideo: RoPE was lost).

How the rows are read for these DiTs (the builder writes them for text models):
- the row's `dataset`: HunyuanVideo's `hunyuanvideo` is the prompt set in lab_calib/ (core/sd_dataset.py); the
  "(default)" rows of FLUX.1 and Qwen-Image-Edit get the builder's text corpus, which is not a prompt set, so the
  prompt is inference_config's; the other sampling settings are the tiny pipeline's, `enable_dump: false`
  (everything is dynamic: nothing samples);
- `exclude: [lm_head]` matches nothing in a DiT, and is kept;
- qwen-image-edit-w4a4f4-mxfp: the builder gives the dual-scale activations method minmax and no block size; the
  scheme W4A4_MXFP4_DUALSCALE takes method dualscale for both with one `dual_block_size` (64 here: it divides the
  tiny DiT's 64- and 256-wide inputs), and FA3 MXFP4 per block needs heads of 32 (the tiny Qwen-Image has 2 x 32).

Bound, as tests/test_diffusion_wan_mx.py derives it: an element rounded to E4M3 (3 mantissa bits) has RMS relative
error 2^-4/sqrt(3) = 0.036; a linear rounds both operands (x sqrt(2) = 0.051); FA3 rounds Q, K and V once each.
Errors adding in quadrature with no credit for the float residual stream: sqrt(L * 0.051^2 + 3 A * 0.036^2) for L
linears and A attentions (FLUX.1 and HunyuanVideo: 40 and 4, 0.35; Qwen-Image-Edit: 28 and 2, 0.28). For the
4-bit row the same sum (E2M1: 0.144 per operand) exceeds 1 and says nothing: its check is 0.5, as for Wan's 4-bit
rows, which a wrong layout or scale (errors of order 1) still fails.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tiny_dit import (count_pipeline_calls, make_picture, make_tiny_flux, make_tiny_hunyuan_video,
                      make_tiny_qwen_image_edit, quant)
from upstream_recipes import ROWS, config_of

diffusers = pytest.importorskip("diffusers")

ROW_FILES = {"flux1/flux1_w8a8f8_mxfp.yaml": "flux", "hunyuan_video/hunyuan_video_w8a8f8_mxfp.yaml": "hunyuan",
             "qwen_image_edit/qwen-image-edit-w8a8f8-mxfp.yaml": "qwen_image_edit",
             "qwen_image_edit/qwen-image-edit-w4a4f4-mxfp.yaml": "qwen_image_edit_32"}
QIE = "qwen_image_edit"
MODEL_TYPE = {"flux": "FLUX.1-dev", "hunyuan": "HunyuanVideo", QIE: "Qwen-Image-Edit-2509",
              f"{QIE}_32": "Qwen-Image-Edit-2509"}
PIPELINE = {"flux": "FluxPipeline", "hunyuan": "HunyuanVideoPipeline", QIE: "QwenImageEditPlusPipeline",
            f"{QIE}_32": "QwenImageEditPlusPipeline"}
LINEARS = {"flux": 40, "hunyuan": 40, QIE: 28, f"{QIE}_32": 28}
ATTENTIONS = {"flux": 4, "hunyuan": 4, QIE: 2, f"{QIE}_32": 2}  # one joint attention per block
BLOCK_LISTS = {"flux": ("transformer_blocks", "single_transformer_blocks"),
               "hunyuan": ("transformer_blocks", "single_transformer_blocks"),
               QIE: ("transformer_blocks",), f"{QIE}_32": ("transformer_blocks",)}
TINY_SAMPLING = {"flux": {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16},
                 "hunyuan": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3,
                             "max_sequence_length": 16},
                 QIE: {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 64}}
TINY_SAMPLING[f"{QIE}_32"] = TINY_SAMPLING[QIE]
DUAL_SCALE = {"dtype": "mxfp4", "scope": "dual_scale", "symmetric": True, "method": "dualscale",
              "ext": {"dual_block_size": 64}}
HELD_OUT = ["a red kite above a beach"]


def family_of(kind: str):
    from msmodelslim.model.diffusion import FLUX1, HUNYUAN_VIDEO, QWEN_IMAGE_EDIT

    return {"flux": FLUX1, "hunyuan": HUNYUAN_VIDEO, QIE: QWEN_IMAGE_EDIT, f"{QIE}_32": QWEN_IMAGE_EDIT}[kind]


def bound(kind: str) -> float:
    return math.sqrt(LINEARS[kind] * 0.051 ** 2 + 3 * ATTENTIONS[kind] * 0.036 ** 2)


@pytest.fixture(scope="module", autouse=True)
def small_vae_images():
    """diffusers resizes Qwen-Image-Edit's input images to ~1024*1024 pixels for the VAE: 32*32 here."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
        yield


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit_mx")
    return {"flux": make_tiny_flux(root / "flux" / "FLUX.1-tiny"),
            "hunyuan": make_tiny_hunyuan_video(root / "hunyuan" / "HunyuanVideo-tiny"),
            QIE: make_tiny_qwen_image_edit(root / "qie" / "Qwen-Image-Edit-tiny"),
            f"{QIE}_32": make_tiny_qwen_image_edit(root / "qie32" / "Qwen-Image-Edit-tiny", head_dim=32),
            "picture": make_picture(root / "input.png")}


def dit_config(file: str, picture: Path) -> dict:
    """The row's config (upstream_recipes.config_of) read for the family's diffusers DiT (the module docstring)."""
    row = next(r for r in ROWS if r.file == file)
    recipe = config_of(row, False)
    spec = recipe["spec"]
    kind = ROW_FILES[file]
    sampling = dict(TINY_SAMPLING[kind])
    if row.dataset == "(default)":
        spec.pop("dataset")
        sampling["prompt"] = "a cat holds a sign"
    if kind.startswith(QIE):
        sampling["image"] = str(picture)
    if "mxfp4/dual_scale" in row.schemes:  # the module docstring
        spec["process"][0]["qconfig"] = {"act": DUAL_SCALE, "weight": DUAL_SCALE}
    spec["multimodal_sd_config"] = {"dump_config": {"enable_dump": False}, "inference_config": sampling}
    return recipe


def write(config: dict, tmp: Path) -> Path:
    path = tmp / "row.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("file", list(ROW_FILES))
def test_the_row_runs_end_to_end(file, pipelines, tmp_path, monkeypatch, capsys):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.fa3 import FA3DynamicQuant
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.processor.online_quarot.rotation import OnlineRotation

    kind = ROW_FILES[file]
    family = family_of(kind)
    config = dit_config(file, pipelines["picture"])
    assert {s["type"] for s in config["spec"]["process"]} == {"linear_quant", "online_quarot", "fa3_quant"}
    calls = count_pipeline_calls(monkeypatch, PIPELINE[kind])
    out = tmp_path / "out"
    assert quant(pipelines[kind], out, write(config, tmp_path), MODEL_TYPE[kind]) == 0, capsys.readouterr().err
    assert calls == []  # every step is dynamic and enable_dump is false: nothing sampled
    folder = out / "transformer"
    description = json.loads((folder / "quant_model_description.json").read_text())
    weights = {k: v for k, v in description.items() if k.endswith(".weight") and v != "FLOAT"}
    linear_type, fa3_type = ("W4A4_MXFP4_DUALSCALE", "MXFP4_DYNAMIC") if "w4a4" in file else ("W8A8_MXFP8",
                                                                                              "FP8_DYNAMIC")
    assert len(weights) == LINEARS[kind] and set(weights.values()) == {linear_type}
    assert all(k.startswith(tuple(f"{b}." for b in BLOCK_LISTS[kind])) for k in weights)
    assert description["model_quant_type"] == linear_type
    rotations = [k for k in description if k.endswith(("q_rot", "k_rot"))]
    assert len(rotations) == 2 * ATTENTIONS[kind] and all(description[k] == "FLOAT" for k in rotations)
    fa3 = [k for k in description if k.endswith(".quant_type")]
    assert len(fa3) == ATTENTIONS[kind] and all(k.endswith(".attn.quant_type") for k in fa3)
    assert {description[k] for k in fa3} == {fa3_type}
    assert [f for f in check_ascendv1(folder) if f.level == "error"] == []
    float_pipe = family.load_pipeline(pipelines[kind], torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(out, family)  # from the output folder alone
    dit = quant_pipe.transformer
    assert sum(isinstance(m, QuantLinear) for m in dit.modules()) == LINEARS[kind]
    assert sum(isinstance(m, OnlineRotation) for m in dit.modules()) == 2 * ATTENTIONS[kind]
    assert sum(isinstance(m, FA3DynamicQuant) for m in dit.modules()) == 3 * ATTENTIONS[kind]
    report = compare_pipelines(float_pipe, quant_pipe, family, saved_sampling(out, family, steps=4), HELD_OUT)
    print(f"\n{file}\n{report.table()}")
    assert 0 < max(report.rel_errors) < (0.5 if "w4a4" in file else bound(kind)), report.table()
    assert all(p > (10 if "w4a4" in file else 25) for p in report.latent_psnr_db), report.table()


@pytest.mark.parametrize("kind", ["flux", "hunyuan", QIE])
def test_online_quarot_alone_is_exact_in_float_over_both_kinds_of_blocks(kind, pipelines, tmp_path):
    """The rotated DiT, read back with its q_rot/k_rot in every dual- and single-stream block, gives the float
    DiT's outputs (float32 rounding only): Q·Rᵀ(K·Rᵀ)ᵀ = QKᵀ over the joint image+text tokens."""
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline

    family = family_of(kind)
    sampling = {**TINY_SAMPLING[kind], "prompt": "a cat"}
    if kind == QIE:
        sampling["image"] = str(pipelines["picture"])
    config = {"apiversion": "multimodal_sd_modelslim_v1",
              "spec": {"process": [{"type": "online_quarot"}],
                       "multimodal_sd_config": {"dump_config": {"enable_dump": False},
                                                "inference_config": sampling}}}
    out = tmp_path / "rotated"
    assert quant(pipelines[kind], out, write(config, tmp_path), MODEL_TYPE[kind]) == 0
    description = json.loads((out / "transformer" / "quant_model_description.json").read_text())
    assert [k for k in description if k.endswith("_rot")] == [
        f"{b}.{i}.attn.{r}" for b in BLOCK_LISTS[kind] for i in (0, 1) for r in ("q_rot", "k_rot")]
    float_pipe = family.load_pipeline(pipelines[kind], torch.device("cpu"))
    report = compare_pipelines(float_pipe, load_quantized_pipeline(out, family), family,
                               saved_sampling(out, family, steps=4), HELD_OUT)
    print(f"\n{kind} online_quarot alone: max relative error {max(report.rel_errors):.3g}")
    assert max(report.rel_errors) < 1e-5, report.table()

