"""FA3 dynamic floating-point branches (issue #22): fp8_e4m3 per_token and mxfp8 / mxfp4 per_block (blocks of 32
along the head dim, E8M0 shared scale) against slow scalar references; the `<attn>.quant_type` strings
(protocol.md §4.3) and their parser; tiny Llama and DeepSeek-V3 (MLA latent) runs through quant → check → both
readers; the refusals before any weight is read."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SCHEMES, run_quant, small_calib, saved_tensors
from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.fa3 import BRANCH_TOKENS, join_quant_type, parse_quant_type
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.fa3 import BRANCHES, FA3DynamicQuant
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.fa3_quant.processor import quant_type_string
from msmodelslim.quantizer.fa3 import fake_quantize_fp8_per_token, fake_quantize_mx_per_block
from reference_reader import load_reference_model
from test_fa3 import float_model, ids_of, write_pipeline
from tiny_models import make_tiny_model

FP8 = {"dtype": "fp8_e4m3", "scope": "per_token", "symmetric": True, "method": "minmax"}
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
# Between our reader and the reference reader: the same quantization in float32, different attention kernels (sdpa
# vs a plain softmax): measured ~5e-7 of the largest logit; an FP8/MX element flipping at a rounding boundary would
# move them by ~1e-3.
READER_AGREEMENT = 1e-4


# ---- slow scalar references: python floats, one element at a time ------------------------------------------------
def slow_e4m3(v: float) -> float:
    """The nearest FP8 E4M3 value (3 mantissa bits; subnormal step 2^-9 below 2^-6), ties to even, saturating at
    448."""
    a = min(abs(v), 448.0)
    if a == 0:
        return 0.0
    _, e = math.frexp(a)  # a = m · 2^e, m in [0.5, 1)
    step = 2.0 ** (max(e - 1, -6) - 3)
    return math.copysign(min(round(a / step) * step, 448.0), v)  # round(): half to even


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def slow_e2m1(v: float) -> float:
    """The nearest E2M1 magnitude, a tie to the even code (index), saturating at 6."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(a - E2M1[i]), i % 2))
    return math.copysign(E2M1[best], v)


def slow_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Per vector of the last axis: s = max|x| / 448 (float32), each element E4M3(x / s) · s (float32 arithmetic)."""
    out = torch.empty_like(x)
    flat, result = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        row = [np.float32(v) for v in flat[r].tolist()]
        s = max(np.float32(max(abs(v) for v in row)) / np.float32(448), np.float32(np.finfo(np.float32).tiny))
        for d, v in enumerate(row):
            result[r, d] = float(np.float32(slow_e4m3(float(np.float32(v / s)))) * s)
    return out


def slow_mx_per_block(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per block of 32 along the last axis: X = 2^(floor(log2 amax) - emax) clamped to [2^-127, 2^127] (2^-127 for
    an all-zero block), each element element(x / X) · X; E4M3 emax 8, E2M1 emax 2."""
    element, emax = (slow_e4m3, 8) if dtype == "mxfp8" else (slow_e2m1, 2)
    out = torch.empty_like(x)
    flat, result = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        row = flat[r].tolist()
        for start in range(0, len(row), 32):
            block = row[start:start + 32]
            amax = max(abs(v) for v in block)
            e = math.frexp(amax)[1] - 1 - emax if amax > 0 else -127
            scale = 2.0 ** max(-127, min(127, e))
            for d, v in enumerate(block):
                result[r, start + d] = element(v / scale) * scale
    return out


def attention_like(seed: int, dim: int = 64) -> torch.Tensor:
    """[batch 2, heads 3, tokens 5, dim] with outliers, an all-zero token, and values on rounding ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, dim, generator=g) * torch.exp(torch.randn(2, 3, 5, 1, generator=g))
    x[0, 0, 1] = 0.0
    x[1, 2, 3, :8] = torch.tensor([6.0, 2.5, 5.0, 0.25, -2.5, 1.0625, 7.5, -0.75])  # E2M1/E4M3 ties, saturation
    x[1, 1, 2, 5] *= 80.0
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_per_token_is_the_scalar_reference(seed):
    x = attention_like(seed)
    got = fake_quantize_fp8_per_token(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, slow_fp8_per_token(x))
    assert not torch.equal(got, x)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", ["mxfp8", "mxfp4"])
def test_mx_per_block_is_the_scalar_reference(seed, dtype):
    x = attention_like(seed)
    got = fake_quantize_mx_per_block(x, dtype)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, slow_mx_per_block(x, dtype))


def test_mx_blocks_are_independent_and_along_the_head_dim():
    """Scaling one block by 2^k scales its output by 2^k and leaves the other block as it was."""
    x = attention_like(3)
    y = x.clone()
    y[..., 32:] *= 1024.0
    for dtype in ("mxfp8", "mxfp4"):
        a, b = fake_quantize_mx_per_block(x, dtype), fake_quantize_mx_per_block(y, dtype)
        assert torch.equal(a[..., :32], b[..., :32]) and torch.equal(a[..., 32:] * 1024.0, b[..., 32:])


def test_mx_refuses_a_head_dim_that_is_not_blocks_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quantize_mx_per_block(torch.ones(1, 1, 2, 48), "mxfp4")
    with pytest.raises(ValueError, match="not an MX dtype"):
        fake_quantize_mx_per_block(torch.ones(1, 1, 2, 32), "fp8_e4m3")


# ---- quant_type strings ---------------------------------------------------------------------------------------
def _config(**fields) -> FA3QuantConfig:
    return FA3QuantConfig(type="fa3_quant", **fields)


@pytest.mark.parametrize("fields, expected", [
    ({"qconfig": FP8}, "FP8_DYNAMIC"),
    ({"qconfig": MXFP8}, "MXFP8_DYNAMIC"),
    ({"qconfig": MXFP4}, "MXFP4_DYNAMIC"),
    ({"details": {"fa_q": FP8, "fa_k": MXFP4, "fa_v": MXFP4}}, "Q_FP8_DYNAMIC_KV_MXFP4_DYNAMIC"),
    ({"details": {"fa_q": MXFP8, "fa_k": MXFP8, "fa_v": MXFP4}}, "QK_MXFP8_DYNAMIC_V_MXFP4_DYNAMIC"),
    ({"details": {"fa_q": FP8, "fa_k": MXFP4, "fa_v": MXFP8}}, "Q_FP8_DYNAMIC_K_MXFP4_DYNAMIC_V_MXFP8_DYNAMIC"),
    ({"details": {"fa_q": {"dtype": "int8", "scope": "per_token"}, "fa_k": FP8, "fa_v": FP8}},
     "Q_INT8_DYNAMIC_KV_FP8_DYNAMIC"),
])
def test_quant_type_strings_as_the_spec_builds_them(fields, expected):
    """protocol.md §4.3: branches Q, K, V; neighbours sharing (dtype, strategy) merge; one setting for all three
    drops the prefix; `_DYNAMIC` for per_token/per_block."""
    assert quant_type_string(_config(**fields)) == expected
    assert parse_quant_type(expected) == dict(zip(BRANCHES, [_token(f) for f in _branch_settings(fields)]))


def _branch_settings(fields: dict) -> list[dict]:
    if "qconfig" in fields:
        return [fields["qconfig"]] * 3
    return [fields["details"][b] for b in BRANCHES]


def _token(setting: dict) -> str:
    return {v: k for k, v in BRANCH_TOKENS.items()}[setting["dtype"], setting["scope"]]


def test_every_token_triple_parses_back():
    for tokens in itertools.product(BRANCH_TOKENS, repeat=3):
        assert parse_quant_type(join_quant_type(list(tokens))) == dict(zip(BRANCHES, tokens))
    for bad in ("QKV_FP8_DYNAMIC", "Q_FP8_DYNAMIC_K_FP8_DYNAMIC_V_INT8", "KV_FP8_DYNAMIC_Q_INT8", "FP8",
                "Q_FP8_DYNAMIC_KV_MXFP6_DYNAMIC", "Q_FP8_DYNAMIC_KV", 7):
        assert parse_quant_type(bad) is None, bad


# ---- end to end: quant -> check -> both readers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """Tiny Llama with head_dim 32: one MX block per head."""
    return make_tiny_model(tmp_path_factory.mktemp("llama32"), "llama", head_dim=32)


@pytest.fixture(scope="module")
def deepseek32(tmp_path_factory):
    """Tiny DeepSeek-V3 whose latent K = [c_kv; k_rot] (32 + 32) and V = c_kv (32) are whole MX blocks."""
    return make_tiny_model(tmp_path_factory.mktemp("ds32"), "deepseek_v3", kv_lora_rank=32, qk_rope_head_dim=32)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def _run(source, tmp_path, step: dict, model_type: str, extra: list[dict] = (), dataset=None):
    out = tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [step, *extra], dataset=dataset), model_type)
    description = json.loads((out / "quant_model_description.json").read_text())
    return out, description


CASES = {
    "fp8_per_token": ({"qconfig": FP8}, "FP8_DYNAMIC"),
    "details_mx": ({"details": {"fa_q": MXFP8, "fa_k": MXFP4, "fa_v": MXFP4}}, "Q_MXFP8_DYNAMIC_KV_MXFP4_DYNAMIC"),
    "details_fp8_mx": ({"details": {"fa_q": FP8, "fa_k": MXFP4, "fa_v": MXFP8}},
                       "Q_FP8_DYNAMIC_K_MXFP4_DYNAMIC_V_MXFP8_DYNAMIC"),
}


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_float_runs_through_check_and_both_readers(llama32, deepseek32, tmp_path, family, case):
    fields, quant_type = CASES[case]
    source, model_type = (llama32, "Llama-2-7B") if family == "llama" else (deepseek32, "DeepSeek-V3")
    out, description = _run(source, tmp_path, {"type": "fa3_quant", **fields}, model_type)
    layers = float_model(source).config.num_hidden_layers
    assert {k: v for k, v in description.items() if k.endswith(".quant_type")} == {
        f"model.layers.{i}.self_attn.quant_type": quant_type for i in range(layers)}
    assert "fa_quant_type" not in description  # nothing static is saved
    assert not any(".fa_" in k for k in saved_tensors(out)) and not any(".fa_" in k for k in description)
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []

    ours, reference = load_ascendv1(out), load_reference_model(out)
    settings = _branch_settings(fields)
    for branch, setting in zip(BRANCHES, settings):
        module = getattr(ours.model.layers[0].self_attn, branch)
        assert isinstance(module, FA3DynamicQuant) and (module.dtype, module.scope) == (setting["dtype"],
                                                                                        setting["scope"])
    ids = ids_of(ours.config.vocab_size, tokens=12)
    got, expected, floating = _logits(ours, ids), _logits(reference, ids), _logits(float_model(source), ids)
    agreement = _relative(got, expected)
    print(f"{family} {case}: readers differ by {agreement:.1e}, FA3 moves the logits by {_relative(got, floating):.1e}")
    assert agreement < READER_AGREEMENT
    assert _relative(got, floating) > 10 * agreement  # the attention really is quantized, in both readers
    for layer in ours.model.layers:  # and without the branches our reader gives the float model's logits
        for branch in BRANCHES:
            setattr(layer.self_attn, branch, nn.Identity())
    assert _relative(_logits(ours, ids), floating) < 1e-4


def test_later_steps_calibrate_on_the_quantized_attention(llama32, tmp_path):
    """The dynamic branches act from the fa3_quant step on: a static W8A8 step after it calibrates o_proj's input
    scale on the FP8-quantized attention's output (another scale than without FA3)."""
    w8a8 = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": ["*o_proj"]}
    calib = small_calib(tmp_path)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with_fa3, _ = _run(llama32, tmp_path / "a", {"type": "fa3_quant", "qconfig": FP8}, "Llama-2-7B", [w8a8], calib)
    alone = tmp_path / "b" / "out"
    run_quant(llama32, alone, write_pipeline(tmp_path / "b" / "c.yaml", [w8a8], dataset=calib))
    key = "model.layers.1.self_attn.o_proj.input_scale"
    a, b = saved_tensors(with_fa3)[key], saved_tensors(alone)[key]
    assert not torch.equal(a, b) and float((a - b).abs().max()) < 0.1 * float(b.abs().max())


def test_decoding_with_a_cache_reads_what_a_full_forward_reads(llama32, tmp_path):
    """Per-token and per-block scales depend on the token alone: decoding the last token against the cache gives
    the full forward's logits at that position."""
    out, _ = _run(llama32, tmp_path, {"type": "fa3_quant", "details": {"fa_q": FP8, "fa_k": MXFP4, "fa_v": MXFP8}},
                  "Llama-2-7B")
    model = load_ascendv1(out)
    ids = ids_of(model.config.vocab_size, tokens=9)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_checker_reads_the_strings(llama32, tmp_path):
    out, description = _run(llama32, tmp_path, {"type": "fa3_quant", "qconfig": FP8}, "Llama-2-7B")
    path = out / "quant_model_description.json"
    description["model.layers.0.self_attn.quant_type"] = "QKV_FP8_DYNAMIC"
    description["model.layers.1.self_attn.quant_type"] = "Q_INT8_KV_FP8_DYNAMIC"
    path.write_text(json.dumps(description))
    errors = " | ".join(f.message for f in check_ascendv1(out) if f.level == "error")
    assert "'QKV_FP8_DYNAMIC'" in errors and "mixes static" in errors
    from msmodelslim.core.errors import InvalidModelError

    with pytest.raises(InvalidModelError, match="cannot simulate"):
        load_ascendv1(out)


# ---- refusals, before any weight is read ----------------------------------------------------------------------
@pytest.fixture
def no_weight_reads(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)


def test_mx_on_a_head_dim_of_16_is_refused_before_any_weight_is_read(tmp_path, no_weight_reads):
    source = make_tiny_model(tmp_path / "llama16", "llama")  # head_dim 16
    config = write_pipeline(tmp_path / "c.yaml", [{"type": "fa3_quant", "details": {"fa_q": FP8, "fa_k": MXFP4,
                                                                                     "fa_v": MXFP4}}])
    with pytest.raises(UnsupportedError, match=r"fa_k is mxfp4 per_block.*16.*not a multiple of the MX block 32"):
        run_quant(source, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qconfig, words", [
    ({"dtype": "fp8_e4m3", "scope": "per_head"}, "static FP8"),
    ({"dtype": "fp8_e4m3", "scope": "per_block"}, "fp8_e4m3 takes per_token"),
    ({"dtype": "mxfp4", "scope": "per_token"}, "mxfp4 takes per_block"),
    ({"dtype": "mxfp4", "scope": "dual_scale"}, "not implemented yet"),
])
def test_float_settings_that_do_not_exist_are_refused(qconfig, words):
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "fa3_quant", "qconfig": qconfig}]}})
    assert words in str(info.value)


def test_static_and_dynamic_branches_do_not_mix():
    with pytest.raises(ConfigError, match="mixes FA3 scopes"):
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": [
            {"type": "fa3_quant", "details": {"fa_q": FP8, "fa_k": {"dtype": "int8", "scope": "per_head"},
                                              "fa_v": MXFP4}}]}})
