"""Wan2.1 W8A8 dynamic end to end on a tiny random diffusers WanPipeline (multimodal_sd_modelslim_v1):
quant -> ascendv1 DiT + copied components -> reader -> the quantized pipeline samples; calibration dump reuse
and refusal; the format read back independently; refusals by name.

Denoiser error bound (docs/diffusion.md): symmetric int8 with scale s = max|v|/127 rounds every element by at
most s/2, uniformly, so its RMS error is s/sqrt(12); for a vector whose crest factor is k = max|v|/rms(v) the
relative RMS error is k/(127*sqrt(12)). A W8A8 dynamic linear rounds both operands (each token of the input,
each output channel of the weight) independently: relative output error ~ sqrt(2)*k/(127*sqrt(12)). The tiny
DiT has L = 20 quantized linears (10 per block). With no credit for the float residual stream that dilutes them,
and their errors adding in quadrature along the network, the denoiser's relative error is at most
sqrt(L)*sqrt(2)*k/(127*sqrt(12)); k <= 4 for these 32..64-wide activations and weights (a Gaussian vector of
that width has k ~ 2.5..3.5) gives 0.0575, so the bound is 0.06. A wrong scale or a wrong layout gives errors of
order 1; an unquantized DiT gives 0, which the test refuses too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from msmodelslim.cli.__main__ import main
from tiny_models import make_tokenizer

diffusers = pytest.importorskip("diffusers")

NUM_LAYERS = 2
LINEARS_PER_BLOCK = 10  # attn1 q/k/v/out, attn2 q/k/v/out, ffn up/down
CREST_FACTOR = 4.0
DENOISER_BOUND = math.sqrt(NUM_LAYERS * LINEARS_PER_BLOCK) * math.sqrt(2) * CREST_FACTOR / (127 * math.sqrt(12))
W8A8_DYNAMIC = {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
                "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}
SAMPLING = {"prompt": ["a cat walks on the grass", "a dog runs in the snow"], "size": "64*64", "frame_num": 5,
            "sample_steps": 3, "max_sequence_length": 16, "sample_guide_scale": 5.0,
            "negative_prompt": "blurry"}


def make_tiny_wan(path: Path, seed: int = 0, boundary_ratio: float | None = None, ti2v: bool = False,
                  head_dim: int = 16) -> Path:
    """A WanPipeline folder as save_pretrained writes it, every component tiny and random. With `boundary_ratio`:
    Wan2.2-T2V-A14B's layout, a second random DiT (transformer_2, the low-noise expert) of the same shape. With
    `ti2v`: Wan2.2-TI2V-5B's, expand_timesteps and the residual VAE with 48 latent channels and spatial factor 16."""
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    make_tokenizer(path.parent / f"{path.name}_tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent / f"{path.name}_tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0))
    latent = 48 if ti2v else 16
    vae_kwargs = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                      latents_mean=[0.0] * latent, latents_std=[1.0] * latent) if ti2v else {}
    vae = diffusers.AutoencoderKLWan(base_dim=8 if ti2v else 3, z_dim=latent, dim_mult=[1, 1, 1, 1],
                                     num_res_blocks=1, temperal_downsample=[False, True, True], **vae_kwargs)
    def dit():
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=latent,
            out_channels=latent,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    transformer = dit()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    wan2_2 = {} if boundary_ratio is None else {"transformer_2": dit(), "boundary_ratio": boundary_ratio}
    if ti2v:
        wan2_2["expand_timesteps"] = True
    diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                          transformer=transformer, **wan2_2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny")


def write_config(path: Path, process=None, save=None, dump_dir: str = "", **sampling) -> Path:
    spec = {"process": process if process is not None else [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC}],
            "save": save or [{"type": "ascendv1_saver", "part_file_size": 0}],
            "multimodal_sd_config": {"dump_config": {"dump_data_dir": dump_dir},
                                     "inference_config": {**SAMPLING, **sampling}}}
    path.write_text(yaml.safe_dump({"apiversion": "multimodal_sd_modelslim_v1", "spec": spec}))
    return path


def quant(model: Path, out: Path, config: Path, *extra: str, model_type: str = "Wan2.1") -> int:
    return main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", model_type, "--config_path", str(config), *extra])


RECIPE = Path(__file__).resolve().parent.parent / "msmodelslim" / "model" / "diffusion" / "wan2_1_w8a8_dynamic.yaml"


@pytest.fixture(scope="module")
def quantized(wan, tmp_path_factory) -> Path:
    """The recipe of protocol.md's wan2_1/wan2_1_w8a8_dynamic.yaml row, with the tiny model's sampling."""
    tmp = tmp_path_factory.mktemp("w8a8")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["spec"]["process"] == [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"]}]
    recipe["spec"]["multimodal_sd_config"]["inference_config"] = SAMPLING
    (tmp / "w8a8.yaml").write_text(yaml.safe_dump(recipe))
    assert quant(wan, tmp / "out", tmp / "w8a8.yaml") == 0
    return tmp / "out"


def test_w8a8_dynamic_writes_an_ascendv1_dit_and_copies_the_rest(wan, quantized):
    from msmodelslim.format.ascendv1.checker import check_ascendv1

    dit = quantized / "transformer"
    description = json.loads((dit / "quant_model_description.json").read_text())
    quantized_weights = sorted(k for k, v in description.items() if k.endswith(".weight") and v == "W8A8_DYNAMIC")
    assert len(quantized_weights) == NUM_LAYERS * LINEARS_PER_BLOCK
    assert all(k.startswith("blocks.") for k in quantized_weights)
    assert description["proj_out.weight"] == "FLOAT"  # outside the blocks nothing is quantized
    assert description["model_quant_type"] == "W8A8_DYNAMIC"
    assert [f for f in check_ascendv1(dit) if f.level == "error"] == []
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for file in (wan / component).iterdir():
            assert (quantized / component / file.name).read_bytes() == file.read_bytes()
    assert (quantized / "model_index.json").read_bytes() == (wan / "model_index.json").read_bytes()
    assert (quantized / "calib_data.pth").is_file() and (quantized / "wan2_1_best_practice.yaml").is_file()


def test_the_quantized_pipeline_samples_within_the_int8_bound(wan, quantized, capsys):
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.ir.quant_linear import QuantLinear
    from msmodelslim.model.diffusion import WAN2_1

    float_pipe = WAN2_1.load_pipeline(wan, torch.device("cpu"))
    quant_pipe = load_quantized_pipeline(quantized, WAN2_1)  # everything from the output folder alone
    linears = [m for m in quant_pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == NUM_LAYERS * LINEARS_PER_BLOCK and {m.scheme.value for m in linears} == {"W8A8_DYNAMIC"}
    # held-out prompts, and 4 steps: timesteps the 3-step calibration schedule never visited
    report = compare_pipelines(float_pipe, quant_pipe, WAN2_1, saved_sampling(quantized, WAN2_1, steps=4),
                               ["a red kite above a beach", "a train on a snowy bridge"])
    print(report.table())
    assert len(report.rel_errors) == 2 * 4 * 2  # prompts x steps x (conditional, unconditional)
    assert 0 < max(report.rel_errors) < DENOISER_BOUND, report.table()
    assert min(report.cosines) > 1 - DENOISER_BOUND ** 2 / 2  # cos = 1 - e^2/2 for a small error e
    assert all(math.isfinite(p) and p > 20 for p in report.latent_psnr_db), report.table()


@torch.no_grad()
def test_each_quantized_block_update_is_within_the_int8_bound(wan, quantized):
    """The denoiser's error is diluted by the float residual stream; a block's own update f(x) - x is not: its
    relative error is bounded by the same grid argument over the block's 10 linears. The captured block inputs
    are also where the crest factor assumed in the bound is checked."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import WAN2_1

    float_dit = WAN2_1.load_pipeline(wan, torch.device("cpu")).transformer
    quant_dit = load_quantized_denoiser(quantized / "transformer", WAN2_1)
    samples = torch.load(quantized / "calib_data.pth", weights_only=True)["samples"]
    bound = math.sqrt(LINEARS_PER_BLOCK) * math.sqrt(2) * CREST_FACTOR / (127 * math.sqrt(12))
    worst = 0.0
    for hidden, *rest in samples:
        crest = hidden.abs().amax(-1) / hidden.pow(2).mean(-1).sqrt()
        assert float(crest.max()) <= CREST_FACTOR
        for f_block, q_block in zip(float_dit.blocks, quant_dit.blocks):
            f_update = f_block(hidden, *rest) - hidden
            q_update = q_block(hidden, *rest) - hidden
            worst = max(worst, float((q_update - f_update).norm() / f_update.norm()))
            hidden = f_block(hidden, *rest)
    assert 0 < worst < bound, (worst, bound)


def test_msmodelslim_eval_prints_the_before_after_table(wan, quantized, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite above a beach\n")
    assert main(["eval", "--model_path", str(wan), "--quant_path", str(quantized), "--dataset", str(prompts),
                 "--max_windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "denoiser relative error, mean" in out and "final-latent PSNR after 4 steps" in out


def test_reloaded_linear_computes_the_w8a8_dynamic_kernel(quantized):
    """Reference: int8 codes of each token with s_t = max|x_t|/127, int8 weights times their channel scales."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import WAN2_1

    linear = load_quantized_denoiser(quantized / "transformer", WAN2_1).blocks[1].ffn.net[2]
    x = torch.randn(5, linear.in_features) * torch.linspace(0.1, 3, linear.in_features)
    s_x = x.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.clamp(torch.round(x / s_x), -128, 127)
    weight = linear.qweight.double() * linear.weight_scale.double()
    expected = (codes.double() * s_x.double()) @ weight.T + linear.bias.double()
    assert torch.allclose(linear(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_saved_tensors_dequantize_to_the_float_weights_within_half_a_step(wan, quantized):
    """Read with safetensors alone (not our reader): every int8 weight times its scale is within scale/2 of the
    float weight; every FLOAT tensor is the float checkpoint's, bit for bit."""
    source = load_file(str(wan / "transformer" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
    description = json.loads((quantized / "transformer" / "quant_model_description.json").read_text())
    for name, tag in description.items():
        if not isinstance(tag, str) or name not in saved:
            continue
        if tag == "FLOAT":
            assert torch.equal(saved[name], source[name]), name
        elif name.endswith(".weight"):
            prefix = name[: -len(".weight")]
            q, scale = saved[name], saved[f"{prefix}.weight_scale"]
            assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
            assert torch.count_nonzero(saved[f"{prefix}.weight_offset"]) == 0
            error = (q.double() * scale.double() - source[name].double()).abs()
            assert bool((error <= scale.double() / 2 * (1 + 1e-6)).all()), name
    assert set(saved) == {k for k, v in description.items() if isinstance(v, str) and k in saved}
    assert len(saved) == sum(1 for k in description if k in saved)


W8A8_STATIC = {"act": {"scope": "per_tensor", "dtype": "int8", "symmetric": False, "method": "minmax"},
               "weight": W8A8_DYNAMIC["weight"]}


@pytest.mark.parametrize("qconfig,dtype_tag", [(W8A8_DYNAMIC, "w8a8_dynamic"), (W8A8_STATIC, "w8a8")])
def test_mindie_format_names_its_files_by_type_and_reads_back(wan, quantized, tmp_path, qconfig, dtype_tag):
    """W8A8 static also exercises calibration: its activation ranges come from the captured block inputs, each
    block calibrated on the outputs of the block before it."""
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import WAN2_1

    config = write_config(tmp_path / "c.yaml", process=[{"type": "linear_quant", "qconfig": qconfig}],
                          save=[{"type": "mindie_format_saver", "part_file_size": 0}])
    assert quant(wan, tmp_path / "out", config) == 0
    dit = tmp_path / "out" / "transformer"
    assert sorted(p.name for p in dit.iterdir()) == sorted(
        ["config.json", f"quant_model_description_{dtype_tag}.json", f"quant_model_weight_{dtype_tag}.safetensors"])
    description = json.loads((dit / f"quant_model_description_{dtype_tag}.json").read_text())
    assert description["model_quant_type"] == dtype_tag.upper()
    assert "version" not in description and "group_size" not in description
    saved = load_file(str(dit / f"quant_model_weight_{dtype_tag}.safetensors"))
    assert set(saved) == {k for k in description if k != "model_quant_type"}
    samples = torch.load(quantized / "calib_data.pth", weights_only=True)["samples"]
    mindie_dit = load_quantized_denoiser(dit, WAN2_1)
    if dtype_tag == "w8a8_dynamic":  # the same tensors as the ascendv1 output, under other file names
        ascend = load_file(str(quantized / "transformer" / "quant_model_weights.safetensors"))
        assert saved.keys() == ascend.keys() and all(torch.equal(saved[k], ascend[k]) for k in saved)
    else:
        deq = [k for k in saved if k.endswith(".deq_scale")]
        assert len(deq) == NUM_LAYERS * LINEARS_PER_BLOCK and all(saved[k].dtype == torch.float32 for k in deq)
        float_dit = WAN2_1.load_pipeline(wan, torch.device("cpu")).transformer
        with torch.no_grad():
            hidden, *rest = samples[0]
            reference = float_dit.blocks[0](hidden, *rest) - hidden
            error = float((mindie_dit.blocks[0](hidden, *rest) - hidden - reference).norm() / reference.norm())
        # static per-tensor ranges cover every token of every call: coarser than per token, still a few percent
        print(f"W8A8 static block-0 update relative error: {error:.4g}")
        assert 0 < error < 0.1, error


def test_the_calibration_dump_is_reused(wan, tmp_path, sampling_calls):
    config = write_config(tmp_path / "c.yaml", dump_dir=str(tmp_path / "dump"))
    assert quant(wan, tmp_path / "a", config) == 0
    assert len(sampling_calls) == len(SAMPLING["prompt"])
    assert (tmp_path / "dump" / "calib_data.pth").is_file()
    sampling_calls.clear()
    assert quant(wan, tmp_path / "b", config) == 0
    assert sampling_calls == []  # the second run read the dump instead of sampling
    a = load_file(str(tmp_path / "a" / "transformer" / "quant_model_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer" / "quant_model_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dump_in_the_output_is_reused_by_an_overwriting_run(wan, tmp_path, sampling_calls):
    config = write_config(tmp_path / "c.yaml")
    assert quant(wan, tmp_path / "out", config) == 0
    sampling_calls.clear()
    assert quant(wan, tmp_path / "out", config, "--overwrite") == 0
    assert sampling_calls == [] and (tmp_path / "out" / "calib_data.pth").is_file()


def test_without_the_dump_a_data_free_recipe_never_samples(wan, tmp_path, sampling_calls):
    config = yaml.safe_load(write_config(tmp_path / "c.yaml").read_text())
    config["spec"]["multimodal_sd_config"]["dump_config"]["enable_dump"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert quant(wan, tmp_path / "out", tmp_path / "c.yaml") == 0
    assert sampling_calls == [] and not (tmp_path / "out" / "calib_data.pth").exists()
    description = json.loads((tmp_path / "out" / "transformer" / "quant_model_description.json").read_text())
    assert sum(v == "W8A8_DYNAMIC" for k, v in description.items() if k.endswith(".weight")) == 20


def test_a_dump_of_another_model_or_sampling_is_refused(wan, tmp_path, sampling_calls, capsys):
    dump = str(tmp_path / "dump")
    assert quant(wan, tmp_path / "a", write_config(tmp_path / "c.yaml", dump_dir=dump)) == 0
    other = make_tiny_wan(tmp_path / "other", seed=1)  # same configs, other weights
    sampling_calls.clear()
    capsys.readouterr()
    assert quant(other, tmp_path / "b", write_config(tmp_path / "c.yaml", dump_dir=dump)) == 2
    err = capsys.readouterr().err
    assert "captured from another model or sampling configuration" in err and "transformer/" in err, err
    assert quant(wan, tmp_path / "c", write_config(tmp_path / "d.yaml", dump_dir=dump, sample_steps=4)) == 2
    err = capsys.readouterr().err
    assert "inference_config.sample_steps (3 in the dump, 4 now)" in err, err
    assert sampling_calls == [] and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_blocks_are_read_one_at_a_time_once_the_dump_exists(wan, quantized, tmp_path, monkeypatch, sampling_calls):
    """With the calibration dump present nothing samples, so the whole float DiT is never resident: each block
    is read when its turn comes, and every other block is on the meta device (no memory) meanwhile."""
    from msmodelslim.model.diffusion.weights import DenoiserWeights

    import msmodelslim.app.diffusion as service

    resident: list[int] = []  # after each block is read: how many blocks hold real weights
    skeletons: list = []
    original_materialize, original_skeleton = DenoiserWeights.materialize, service._meta_denoiser

    def watched(self, module, prefix, skip=()):
        original_materialize(self, module, prefix, skip)
        if prefix.startswith("blocks."):
            resident.append(sum(any(not p.is_meta for p in b.parameters()) for b in skeletons[0].blocks))

    def skeleton(*args, **kwargs):
        skeletons.append(original_skeleton(*args, **kwargs))
        return skeletons[-1]

    monkeypatch.setattr(service, "_meta_denoiser", skeleton)
    monkeypatch.setattr(DenoiserWeights, "materialize", watched)
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "calib_data.pth").write_bytes((quantized / "calib_data.pth").read_bytes())
    assert quant(wan, tmp_path / "out", write_config(tmp_path / "c.yaml", dump_dir=str(tmp_path / "dump"))) == 0
    assert sampling_calls == [] and resident == [1] * NUM_LAYERS


def test_a_dry_run_plans_without_loading_weights(wan, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("msmodelslim.model.diffusion.wan.DiffusionFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    assert quant(wan, tmp_path / "out", write_config(tmp_path / "c.yaml"), "--dry_run") == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == NUM_LAYERS * LINEARS_PER_BLOCK and plan[0].endswith("blocks.0.attn1.to_q")
    assert not (tmp_path / "out").exists()
    # --quant_type w8a8: the built-in recipe (832*480, 81 frames, 50 steps: planned here, never sampled)
    assert main(["quant", "--model_path", str(wan), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                 "--model_type", "Wan2.1", "--quant_type", "w8a8", "--dry_run"]) == 0
    assert capsys.readouterr().out.splitlines() == plan


@pytest.mark.parametrize("model_type,spec_change,needle", [
    ("Wan2.2-I2V-A14B", {}, "inference_config.image: Field required"),  # its conditioning image
    ("Wan2.2-T2V-A14B", {}, "model_index.json names one denoiser"),  # the tiny Wan2.1 pipeline has one
    ("Wan2.2", {}, "is not a Wan2.2 diffusers pipeline folder"),  # the line's name on a Wan2.1 folder
    ("Wan2.1", {"process": [{"type": "online_quarot", "block_size": 3}]}, "block_size must be -1"),
    ("Wan2.1", {"process": [{"type": "fa3_quant", "qconfig": {"dtype": "mxfp8", "scope": "per_block"}}]},
     "not a multiple of the MX block 32"),  # the tiny DiT's heads are 16 wide
    # iter_smooth and smooth_quant run on Wan (tests/test_diffusion_smooth.py); the other smoothers are refused
    ("Wan2.1", {"process": [{"type": "flex_smooth_quant"}]},
     "processor 'flex_smooth_quant' is not supported on diffusion"),
    ("Wan2.1", {"save": [{"type": "mindie_format_saver"}], "process": [{"type": "linear_quant", "qconfig": {
        "weight": W8A8_DYNAMIC["weight"]}}]}, "mindie_format_saver does not write W8A16 in this version"),
    ("Wan2.1", {"save": [{"type": "mindie_format_saver"}, {"type": "ascendv1_saver"}]}, "exactly one saver"),
    ("Wan2.1", {"save": [{"type": "compressed_tensors"}]}, "compressed_tensors is not available"),
    ("Wan2.1", {"prior": [{"process": []}]}, "spec.prior is not supported"),
    ("Wan2.1", {"dataset": "wan2_2_t2v"}, "spec.dataset and multimodal_sd_config.inference_config.prompt both"),
    ("Wan2.1", {"inference_config": {"sample_stepz": 3}}, "inference_config.sample_stepz: unknown key"),
    ("Wan2.1", {"inference_config": {"frame_num": 6}}, "must be 4k+1"),
    ("Wan2.1", {"inference_config": {"size": "60*64"}}, "width must be a multiple of 16"),
    ("Wan2.1", {"inference_config": {"task": "i2v-14B"}}, "image-to-video and Wan2.2 tasks are not supported yet"),
    ("Wan2.1", {"inference_config": {}, "model_config": {}}, "cannot both be given"),
    ("Wan2.1", {"dump_config": {"capture_mode": "kwargs"}}, "capture_mode: 'kwargs' is not allowed"),
    ("Llama-2-7B", {}, "'Llama-2-7B' is not a diffusion model"),
])
def test_what_is_missing_is_refused_by_name_before_any_weight(wan, tmp_path, monkeypatch, capsys, sampling_calls,
                                                               model_type, spec_change, needle):
    monkeypatch.setattr("msmodelslim.model.diffusion.wan.DiffusionFamily.load_pipeline",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    config = yaml.safe_load(write_config(tmp_path / "c.yaml").read_text())
    sd = config["spec"]["multimodal_sd_config"]
    for key, value in spec_change.items():
        if key == "inference_config":
            sd["inference_config"].update(value)
        elif key in ("model_config", "dump_config"):
            sd[key] = value
        else:
            config["spec"][key] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert quant(wan, tmp_path / "out", tmp_path / "c.yaml", model_type=model_type) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and sampling_calls == []


@pytest.mark.parametrize("edit,needle", [
    (lambda index: index.update(_class_name="WanImageToVideoPipeline"), "Wan2.1 image-to-video"),
    (lambda index: index.update(transformer_2=["diffusers", "WanTransformer3DModel"]), "two denoisers"),
    (lambda index: index.update(vae=["my_module", "MyVae"]), "nothing from the model folder is run as code"),
])
def test_other_pipelines_are_refused_by_name(wan, tmp_path, capsys, edit, needle):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(wan, copy)
    index = json.loads((copy / "model_index.json").read_text())
    edit(index)
    (copy / "model_index.json").write_text(json.dumps(index))
    assert quant(copy, tmp_path / "out", write_config(tmp_path / "c.yaml")) == 2
    assert needle in capsys.readouterr().err


def test_model_config_is_read_as_the_deprecated_name_of_inference_config(caplog):
    from msmodelslim.core.config import parse_config
    from msmodelslim.core.sd_config import SdPracticeConfig

    config = parse_config({"apiversion": "multimodal_sd_modelslim_v1", "spec": {
        "runner": "model_wise", "multimodal_sd_config": {"model_config": {"sample_steps": 7}}}})
    assert isinstance(config, SdPracticeConfig) and config.spec.runner == "layer_wise"
    assert config.spec.multimodal_sd_config.sampling == {"sample_steps": 7}
    assert "model_config is deprecated" in caplog.text and "using layer_wise" in caplog.text


def test_the_text_quantize_api_refuses_a_diffusion_config_by_name(tmp_path):
    """app/quantize.quantize() is the text/VLM service: a multimodal_sd_modelslim_v1 file given to it directly
    (the Python API) is refused with where to run it, not an AttributeError from deep inside."""
    from msmodelslim.app.quantize_request import QuantizeRequest, load_practice
    from msmodelslim.core.device import parse_device
    from msmodelslim.core.errors import UnsupportedError

    config = Path(__file__).resolve().parents[1] / "msmodelslim" / "model" / "diffusion" / "wan2_1_w8a8_dynamic.yaml"
    request = QuantizeRequest(model_path=tmp_path, save_path=tmp_path / "out", model_type="Wan2.1",
                              device=parse_device("cpu"), config_path=config)
    with pytest.raises(UnsupportedError, match="diffusion pipeline.*quantize_diffusion"):
        load_practice(request)
