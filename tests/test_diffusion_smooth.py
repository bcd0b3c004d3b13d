"""iter_smooth / smooth_quant on Wan DiT blocks (multimodal_sd_modelslim_v1, model/diffusion/smoothing.py,
processor/smooth_dit.py): fused where a producer absorbs X / s (norm2's gain and bias; to_v's rows per head),
non-fusion elsewhere (`<p>.div.mul_scale` + `<p>.linear.*`, ir/non_fusion_smooth.py).

Smoothing alone changes no output in exact arithmetic, so on the tiny random float32 Wan the denoiser's relative
error must be at float32 rounding level (~1e-6; the bound 1e-4 leaves room for the few hundred float32 operations
between input and output, and is ~1000x below what dropping one division gives).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from test_diffusion_wan import NUM_LAYERS, W8A8_DYNAMIC, make_tiny_wan, quant, write_config

diffusers = pytest.importorskip("diffusers")

FLOAT_EXACT = 1e-4
ITER_SMOOTH = {"type": "iter_smooth"}
W8A8_STATIC = {"act": {"scope": "per_tensor", "dtype": "int8", "symmetric": True, "method": "minmax"},
               "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}
NON_FUSION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v", "ffn.net.0.proj", "ffn.net.2")
FUSED_TARGETS = ("attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("wan_smooth") / "Wan2.1-tiny")


@pytest.fixture(scope="module")
def smoothed(wan, tmp_path_factory):
    """iter_smooth alone (no quantization): the float DiT with its scales moved."""
    tmp = tmp_path_factory.mktemp("smoothed")
    assert quant(wan, tmp / "out", write_config(tmp / "c.yaml", process=[ITER_SMOOTH])) == 0
    return tmp / "out"


def dit_inputs(seed: int = 1) -> dict:
    """A random call of the tiny DiT: 16 latent channels, 2 latent frames of 8x8 (4x4 patches), 16 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 2, 8, 8, generator=g), timestep=torch.tensor([900.0, 300.0]),
                encoder_hidden_states=torch.randn(2, 16, 32, generator=g), return_dict=False)


@torch.no_grad()
def relative_error(reference: torch.nn.Module, candidate: torch.nn.Module) -> float:
    errors = []
    for seed in (1, 2):
        want, got = reference(**dit_inputs(seed))[0], candidate(**dit_inputs(seed))[0]
        errors.append(float((got - want).norm() / want.norm()))
    return max(errors)


def float_dit(wan):
    from msmodelslim.model.diffusion import WAN2_1

    return WAN2_1.load_pipeline(wan, torch.device("cpu")).transformer.float().eval()


def saved_dit(out):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import WAN2_1

    return load_quantized_denoiser(out / "transformer", WAN2_1).float().eval()


# ---- the wrapper against its definition ------------------------------------------------------------------------
def test_wrapping_multiplies_the_columns_and_divides_the_input():
    from msmodelslim.ir.non_fusion_smooth import NonFusionSmooth, wrap_with_division

    torch.manual_seed(0)
    root = torch.nn.Sequential(torch.nn.Linear(6, 3))
    x = torch.randn(4, 6)
    want = root(x).detach()
    original = root[0].weight.detach().clone()
    s = torch.rand(6) * 4 + 0.25
    wrapper = wrap_with_division(root, "0", s)
    assert isinstance(root[0], NonFusionSmooth) and root[0] is wrapper
    assert torch.allclose(wrapper.linear.weight, original * s)  # W[:, j] * s_j
    assert torch.allclose(wrapper.div.mul_scale, 1 / s)
    assert torch.allclose(root(x), want, atol=1e-6)
    wrap_with_division(root, "0", s)  # a second pass multiplies into the same wrapper
    assert torch.allclose(root[0].div.mul_scale, 1 / s ** 2) and torch.allclose(root(x), want, atol=1e-5)


# ---- smoothing alone is exact in float ---------------------------------------------------------------------------
def test_iter_smooth_alone_keeps_the_dit_output_and_saves_the_established_layout(wan, smoothed):
    reference = float_dit(wan)
    error = relative_error(reference, saved_dit(smoothed))
    print(f"iter_smooth alone: DiT output relative error {error:.3g}")
    assert error < FLOAT_EXACT

    saved = load_file(str(smoothed / "transformer" / "quant_model_weights.safetensors"))
    description = json.loads((smoothed / "transformer" / "quant_model_description.json").read_text())
    source = load_file(str(wan / "transformer" / "diffusion_pytorch_model.safetensors"))
    for i in range(NUM_LAYERS):
        for name in NON_FUSION:
            p = f"blocks.{i}.{name}"
            assert f"{p}.weight" not in saved and description[f"{p}.div.mul_scale"] == "FLOAT"
            assert description[f"{p}.linear.weight"] == "FLOAT" and f"{p}.linear.bias" in saved
            scale = saved[f"{p}.div.mul_scale"].float()
            assert scale.shape == (source[f"{p}.weight"].shape[1],)
            assert not torch.allclose(scale, torch.ones_like(scale))
            if name.endswith("to_v"):
                continue  # its rows also took the "ov" division (smoothed first, iter_smooth's order)
            # the saved columns are the float columns times s = 1 / mul_scale
            assert torch.allclose(saved[f"{p}.linear.weight"].float() * scale, source[f"{p}.weight"].float(),
                                  rtol=1e-5, atol=1e-6)
        for name in FUSED_TARGETS:  # folded: same names, changed weights, no division
            p = f"blocks.{i}.{name}"
            assert f"{p}.div.mul_scale" not in saved and not torch.allclose(saved[f"{p}.weight"], source[f"{p}.weight"])
        for source_name in ("norm2.weight", "attn1.to_v.linear.bias", "attn2.to_v.linear.bias"):  # X / s went there
            key = f"blocks.{i}.{source_name}"
            original = source[key.replace(".linear.", ".")]
            assert not torch.allclose(saved[key], original)


def test_dropping_the_division_breaks_it(wan, smoothed):
    """The test above can fail: the same DiT with one kind of division removed is far from the float one."""
    from msmodelslim.ir.non_fusion_smooth import NonFusionSmooth

    reference = float_dit(wan)
    broken = saved_dit(smoothed)
    for module in broken.modules():
        if isinstance(module, NonFusionSmooth):
            module.div.mul_scale.data.fill_(1.0)
    error = relative_error(reference, broken)
    print(f"without the divisions: relative error {error:.3g}")
    assert error > 100 * FLOAT_EXACT


def test_the_saved_pipeline_samples_as_the_float_one(wan, smoothed):
    """What `msmodelslim eval` compares (app/diffusion_eval.py), through the reader of the whole output folder."""
    from msmodelslim.app.diffusion_eval import compare_pipelines, saved_sampling
    from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
    from msmodelslim.model.diffusion import WAN2_1

    float_pipe = WAN2_1.load_pipeline(wan, torch.device("cpu"))
    report = compare_pipelines(float_pipe, load_quantized_pipeline(smoothed, WAN2_1), WAN2_1,
                               saved_sampling(smoothed, WAN2_1, steps=2), ["a red kite above a beach"])
    assert report.rel_errors and max(report.rel_errors) < FLOAT_EXACT, report.table()


@pytest.mark.parametrize("model_type, experts", [
    ("Wan2.2-T2V-A14B", {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}),
    ("Wan2.2-TI2V-5B", {"transformer": "transformer"}),
])
def test_wan2_2_experts_are_smoothed_exactly(tmp_path, model_type, experts):
    from msmodelslim.format.ascendv1.diffusion import load_quantized_denoiser
    from msmodelslim.model.diffusion import diffusion_family

    family = diffusion_family(model_type)
    ti2v = model_type.endswith("TI2V-5B")
    wan = make_tiny_wan(tmp_path / "wan22", boundary_ratio=None if ti2v else 0.5, ti2v=ti2v)
    assert quant(wan, tmp_path / "out", write_config(tmp_path / "c.yaml", process=[ITER_SMOOTH],
                                                     **({"size": "64*64"} if ti2v else {})),
                 model_type=model_type) == 0
    pipe = family.load_pipeline(wan, torch.device("cpu"))
    for folder, component in experts.items():
        saved = load_quantized_denoiser(tmp_path / "out" / folder, family).float().eval()
        assert any(n.endswith("ffn.net.2.div") for n, _ in saved.named_modules())
        reference = getattr(pipe, component).float().eval()
        channels = reference.config.in_channels
        with torch.no_grad():
            for seed in (1, 2):
                g = torch.Generator().manual_seed(seed)
                inputs = dict(hidden_states=torch.randn(1, channels, 2, 8, 8, generator=g),
                              timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                              return_dict=False)
                want, got = reference(**inputs)[0], saved(**inputs)[0]
                assert float((got - want).norm() / want.norm()) < FLOAT_EXACT, (folder, seed)


def test_smooth_quant_norm_linear_is_exact_and_the_mindie_saver_writes_the_division(wan, tmp_path):
    config = write_config(tmp_path / "c.yaml", process=[{"type": "smooth_quant"},
                                                         {"type": "linear_quant", "qconfig": W8A8_DYNAMIC}],
                          save=[{"type": "mindie_format_saver", "part_file_size": 0}])
    assert quant(wan, tmp_path / "out", config) == 0
    folder = tmp_path / "out" / "transformer"
    description = json.loads((folder / "quant_model_description_w8a8_dynamic.json").read_text())
    assert description["blocks.0.attn1.to_q.div.mul_scale"] == "FLOAT"
    assert description["blocks.0.attn1.to_q.linear.weight"] == "W8A8_DYNAMIC"
    assert "blocks.0.ffn.net.2.div.mul_scale" not in description  # smooth_quant: norm-linear only
    assert "blocks.0.attn1.to_q.weight" not in description
    # read back with the division; quantized, so within the W8A8 dynamic grid bound of test_diffusion_wan
    from msmodelslim.ir.non_fusion_smooth import NonFusionSmooth
    from msmodelslim.ir.quant_linear import QuantLinear

    dit = saved_dit(tmp_path / "out")
    wrapped = [m for m in dit.modules() if isinstance(m, NonFusionSmooth)]
    # per block: attn1 q/k/v (adaLN), attn2 k/v (the text states), ffn.net.0.proj (adaLN); attn2.to_q is fused
    assert len(wrapped) == NUM_LAYERS * 6 and all(isinstance(m.linear, QuantLinear) for m in wrapped)
    assert relative_error(float_dit(wan), dit) < 0.06


def test_smooth_quant_alone_is_exact(wan, tmp_path):
    config = write_config(tmp_path / "c.yaml", process=[{"type": "smooth_quant", "alpha": 0.8}])
    assert quant(wan, tmp_path / "out", config) == 0
    assert relative_error(float_dit(wan), saved_dit(tmp_path / "out")) < FLOAT_EXACT


# ---- with W8A8 static, as the text recipes use it ----------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_with_outliers(tmp_path_factory):
    """The tiny Wan with DiT-like activation outliers: adaLN's scale (scale_shift_table rows 1 and 4, the (1 + scale)
    of norm1 and norm3) raised by 15 on three channels each, so q/k/v and ffn.net.0.proj read a few large channels."""
    from safetensors.torch import save_file

    path = make_tiny_wan(tmp_path_factory.mktemp("wan_outliers") / "Wan2.1-tiny", seed=0)
    file = path / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    for i in range(NUM_LAYERS):
        table = tensors[f"blocks.{i}.scale_shift_table"]
        table[0, 1, :3] += 15.0
        table[0, 4, 5:8] += 15.0
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def test_smoothing_with_w8a8_static_against_without(wan_with_outliers, tmp_path, capsys):
    """Reported (measured: w8a8 static 0.020, iter_smooth 0.025, smooth_quant 0.014 relative error of the DiT
    output): smooth_quant's alpha 0.5 halves the outlier channels' range and beats plain W8A8 static; iter_smooth's
    alpha 0.9 moves nearly all of it into the weights, which then quantize worse on these 32-wide linears."""
    errors = {}
    reference = float_dit(wan_with_outliers)
    for label, process in (("w8a8 static", []), ("iter_smooth + w8a8 static", [ITER_SMOOTH]),
                           ("smooth_quant + w8a8 static", [{"type": "smooth_quant"}])):
        out = tmp_path / label.replace(" ", "_").replace("+", "")
        config = write_config(tmp_path / f"{out.name}.yaml",
                              process=[*process, {"type": "linear_quant", "qconfig": W8A8_STATIC}])
        assert quant(wan_with_outliers, out, config) == 0
        errors[label] = relative_error(reference, saved_dit(out))
    with capsys.disabled():
        print(f"\nDiT output relative error vs float (adaLN outlier channels): {errors}")
    assert all(0 < e < 0.1 and math.isfinite(e) for e in errors.values()), errors
    assert errors["smooth_quant + w8a8 static"] < 0.85 * errors["w8a8 static"], errors


def test_linear_quant_patterns_match_a_wrapped_linear_by_its_own_name(wan, tmp_path):
    config = write_config(tmp_path / "c.yaml", process=[ITER_SMOOTH, {"type": "linear_quant", "qconfig": W8A8_DYNAMIC,
                                                                      "include": ["*ffn.net.2"]}])
    assert quant(wan, tmp_path / "out", config) == 0
    description = json.loads((tmp_path / "out" / "transformer" / "quant_model_description.json").read_text())
    quantized = sorted(k for k, v in description.items() if v == "W8A8_DYNAMIC" and k.endswith(".weight"))
    assert quantized == [f"blocks.{i}.ffn.net.2.linear.weight" for i in range(NUM_LAYERS)]


# ---- what is not implemented stays refused by name ---------------------------------------------------------------
@pytest.mark.parametrize("step, needle", [
    ({"type": "flex_smooth_quant"}, "flex_smooth_quant"),
    ({"type": "iter_smooth", "enable_subgraph_type": ["linear-linear"]}, "linear-linear"),
])
def test_what_is_not_implemented_is_refused_by_name(wan, tmp_path, capsys, step, needle, monkeypatch):
    from msmodelslim.model.diffusion import WAN2_1

    monkeypatch.setattr(type(WAN2_1), "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    config = write_config(tmp_path / "c.yaml", process=[step])
    assert quant(wan, tmp_path / "out", config) != 0
    assert needle in capsys.readouterr().err


def test_a_family_without_smoothing_subgraphs_refuses_iter_smooth_by_name():
    from msmodelslim.app.diffusion_processors import build_dit_processors
    from msmodelslim.core.errors import UnsupportedError
    from msmodelslim.model.diffusion.flux import FLUX1
    from msmodelslim.processor.iter_smooth.config import IterSmoothConfig

    with pytest.raises(UnsupportedError, match="iter_smooth is not supported yet for .*DiffusionFamily.smoothing"):
        build_dit_processors([IterSmoothConfig(type="iter_smooth")], FLUX1)
