"""GPTQ's `clip_search` (quantizer/clip_search.py) against a slow scalar search, inside GPTQ, and from a config."""
import math

import pytest
import torch

from helpers import run_quant, saved_tensors, small_calib, write_pipeline
from msmodelslim.core.errors import ConfigError
from msmodelslim.quantizer.clip_search import clip_search_range
from msmodelslim.quantizer.gptq import gptq_quantize
from msmodelslim.quantizer.primitives import dequantize_weight, scale_offset_from_minmax


def heavy_tailed(rows=12, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(4) * 3


def slow_search(row, bits, symmetric):
    """Every shrink p = 1 - i/100 (i < 80) of the row's range, scored by Σ|w - Q(w)|^2.4; the first best wins."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = min(min(row), 0.0), max(max(row), 0.0)
    best = (math.inf, None)
    for i in range(80):
        p = 1 - i / 100
        if symmetric:
            scale, zero = max(-p * lo, p * hi) / qmax, 0
        else:
            scale = (p * hi - p * lo) / (qmax - qmin)
            zero = max(qmin, min(qmax, qmin - round(p * lo / scale)))
        error = sum(abs((max(qmin, min(qmax, round(w / scale) + zero)) - zero) * scale - w) ** 2.4 for w in row)
        if error < best[0] * (1 - 1e-6):  # float64 here, float32 there: only a clear win counts as one
            best = (error, scale)
    return best[1]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_matches_a_slow_scalar_search(symmetric):
    w = heavy_tailed()
    scale, _ = clip_search_range(w, 4, symmetric)
    reference = torch.tensor([slow_search(row, 4, symmetric) for row in w.tolist()])
    assert torch.allclose(scale, reference, rtol=1e-5)
    minmax, _ = scale_offset_from_minmax(w.amin(dim=1), w.amax(dim=1), 4, symmetric)
    assert (scale <= minmax).all() and (scale < 0.98 * minmax).any()  # some rows do clip


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest_on_the_searched_ranges():
    """H = identity leaves GPTQ nothing to feed back: the codes are round to nearest with the searched ranges,
    whose weight error Σ|e|^2.4 is never above min/max's."""
    w = heavy_tailed(seed=1)
    h = torch.eye(64, dtype=torch.float64)
    codes, scale, offset = gptq_quantize(w, h, 4, True, 16, clip_search=True)
    groups = w.reshape(12, 4, 16)
    for g in range(4):
        s, o = clip_search_range(groups[:, g], 4, True)
        assert torch.equal(scale[:, g], s) and torch.equal(offset[:, g], o)
        expected = (torch.round(groups[:, g] / s[:, None]) + o[:, None]).clamp(-8, 7)
        assert torch.equal(codes[:, 16 * g:16 * (g + 1)].float(), expected)
    plain = gptq_quantize(w, h, 4, True, 16)
    assert (dequantize_weight(codes, scale, offset) - w).abs().pow(2.4).sum() < (
        dequantize_weight(*plain) - w).abs().pow(2.4).sum()


W4A8 = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
        "weight": {"dtype": "int4", "scope": "per_channel", "symmetric": True, "method": "gptq",
                   "ext": {"clip_search": True}}}


def test_a_config_turns_it_on_for_integer_weights(tiny_llama, tmp_path):
    calib = small_calib(tmp_path)
    clipped = write_pipeline(tmp_path / "c.yaml", [{"type": "linear_quant", "qconfig": W4A8, "exclude": ["lm_head"]}],
                             calib)
    plain_qconfig = {**W4A8, "weight": {**W4A8["weight"], "ext": {}}}
    plain = write_pipeline(tmp_path / "p.yaml", [{"type": "linear_quant", "qconfig": plain_qconfig,
                                                  "exclude": ["lm_head"]}], calib)
    run_quant(tiny_llama, tmp_path / "clipped", clipped)
    run_quant(tiny_llama, tmp_path / "plain", plain)
    a, b = saved_tensors(tmp_path / "clipped"), saved_tensors(tmp_path / "plain")
    name = "model.layers.0.mlp.down_proj.weight_scale"
    assert (a[name] <= b[name] * (1 + 1e-6)).all() and (a[name] < b[name]).any()  # ranges only ever shrink


def test_float_grids_refuse_it_by_name(tiny_llama, tmp_path):
    mx = {"weight": {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "gptq",
                     "ext": {"clip_search": True}}}
    config = write_pipeline(tmp_path / "c.yaml", [{"type": "linear_quant", "qconfig": mx, "exclude": ["lm_head"]}],
                            small_calib(tmp_path))
    with pytest.raises(ConfigError, match="clip_search shrinks integer ranges"):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
