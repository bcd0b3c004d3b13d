"""GPTQ, SSZ and the histogram observer against slow, obviously-correct references, and against min/max."""
import pytest
import torch
import yaml

from helpers import SCHEMES, outputs_of_both_runners, run_quant, small_calib
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.quantizer.gptq import accumulate_hessian, gptq_quantize
from msmodelslim.quantizer.observer import HistogramObserver, MinMaxObserver
from msmodelslim.quantizer.primitives import (
    dequantize_weight,
    fake_quantize,
    quantize_weight_minmax,
    scale_offset_from_minmax,
)
from msmodelslim.quantizer.ssz import ssz_quantize


def correlated_inputs(n=1024, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.2 * torch.randn(n, k, generator=g)


def slow_gptq(w, h, bits, symmetric, group, percdamp=0.01):
    """Optimal Brain Quantization order, one column at a time with an explicit inverse Hessian that is
    updated by Gaussian elimination after each column (no Cholesky, no blocks)."""
    w = w.double().clone()
    h = h.double().clone()
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.zeros(w.shape, dtype=torch.int64)
    cols = w.shape[1]
    size = group or cols
    for j in range(cols):
        if j % size == 0:
            chunk = w[:, j:j + size]
            lo, hi = chunk.amin(1).clamp(max=0), chunk.amax(1).clamp(min=0)
            if symmetric:
                s, o = torch.maximum(-lo, hi) / qmax, torch.zeros_like(lo)
            else:
                s = (hi - lo) / (qmax - qmin)
                o = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
        q = (torch.round(w[:, j] / s) + o).clamp(qmin, qmax)
        codes[:, j] = q.long()
        e = (w[:, j] - (q - o) * s) / hinv[j, j]
        w[:, j + 1:] -= e.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("symmetric,group", [(True, None), (True, 16), (False, 16)])
def test_gptq_matches_the_slow_reference(symmetric, group):
    x = correlated_inputs()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    h, _ = accumulate_hessian(None, 0, x)
    codes, _, _ = gptq_quantize(w, h, 4, symmetric, group, block_size=32)
    reference = slow_gptq(w, h, 4, symmetric, group)
    assert (codes.long() == reference).float().mean() > 0.99  # float32 vs float64 may flip a rare tie


def test_hessian_accumulates_as_one_batch():
    x = correlated_inputs(n=300)
    h_parts, count = None, 0
    for part in x.split(70):
        h_parts, count = accumulate_hessian(h_parts, count, part)
    assert count == 300
    assert torch.allclose(h_parts, 2 * x.double().T @ x.double() / 300)


@pytest.mark.parametrize("group,act_order", [(None, False), (16, False), (16, True)])
def test_gptq_beats_minmax_on_the_layer_output(group, act_order):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    h, _ = accumulate_hessian(None, 0, x)
    ref = x @ w.T

    def output_error(q, s, o):
        return (x @ dequantize_weight(q, s, o).T - ref).pow(2).mean().item()

    gptq = output_error(*gptq_quantize(w, h, 4, True, group, act_order=act_order))
    assert gptq < 0.5 * output_error(*quantize_weight_minmax(w, 4, True, group))


def test_ssz_never_loses_to_minmax_and_nears_a_brute_force_search():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    for symmetric in (True, False):
        q, s, o = ssz_quantize(w, 4, symmetric, 16)
        ssz = (dequantize_weight(q, s, o) - w).pow(2).reshape(16, 4, 16).sum(-1)
        minmax = (dequantize_weight(*quantize_weight_minmax(w, 4, symmetric, 16)) - w).pow(2).reshape(16, 4, 16).sum(-1)
        assert (ssz <= minmax + 1e-12).all()
        assert ssz.sum() < 0.95 * minmax.sum()
    # brute force over symmetric scales for a few groups: SSZ lands within 5 % of the best
    for row in range(4):
        group = w[row, :16]
        best = min(((torch.round(group / sc).clamp(-8, 7) * sc - group).pow(2).sum().item()
                    for sc in torch.linspace(group.abs().max() / 16, group.abs().max() / 4, 2000)))
        q, s, o = ssz_quantize(group.unsqueeze(0), 4, True, None)
        assert (dequantize_weight(q, s, o)[0] - group).pow(2).sum().item() <= 1.05 * best


def _mse(x, obs, symmetric):
    s, o = obs.qparams(8, symmetric)
    return (fake_quantize(x, s, o, 8) - x).pow(2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_search_matches_a_brute_force_search_on_the_raw_values(symmetric):
    g = torch.Generator().manual_seed(4)
    x = torch.distributions.StudentT(2.0).sample((20000,)) * 0.5 + 0.3  # heavy tails, as activations have
    hist, minmax = HistogramObserver(symmetric), MinMaxObserver()
    for part in x.split(4000):  # the range widens from batch to batch: counts are re-binned
        hist.update(part)
        minmax.update(part)
    lo, hi = hist.candidates()
    exact = []
    for a, b in zip(lo.tolist(), hi.tolist()):  # slow reference: true error of every candidate
        s, o = scale_offset_from_minmax(torch.tensor(a), torch.tensor(b), 8, symmetric)
        exact.append((fake_quantize(x, s, o, 8) - x).pow(2).mean().item())
    assert _mse(x, hist, symmetric) <= 1.05 * min(exact)
    assert _mse(x, hist, symmetric) <= _mse(x, minmax, symmetric)
    del g


def test_histogram_clips_a_rare_outlier():
    """int8 clipping pays off only for outliers rarer than about 1 in 10^6 values (the clipping loss
    outweighs the finer grid otherwise); then the gain is large."""
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(6))
    x[123] = 40.0
    hist, minmax = HistogramObserver(False), MinMaxObserver()
    for part in x.split(500_000):
        hist.update(part)
        minmax.update(part)
    assert _mse(x, hist, False) < 0.5 * _mse(x, minmax, False)


def test_histogram_keeps_the_range_when_clipping_costs_more():
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(5))
    x[7, 3] = 80.0  # a single outlier: clipping it costs more than the coarser grid
    hist, minmax = HistogramObserver(False), MinMaxObserver()
    hist.update(x)
    minmax.update(x)
    assert _mse(x, hist, False) <= 1.05 * _mse(x, minmax, False)


def _process(qconfig, exclude=("lm_head",)):
    return [{"type": "linear_quant", "qconfig": qconfig, "exclude": list(exclude)}]


W4_G16_GPTQ = {"weight": {**SCHEMES["w4a16_g16"]["weight"], "method": "gptq", "ext": {"group_size": 16, "act_order": True}}}
W4A8_SSZ = {"act": SCHEMES["w4a8_dynamic"]["act"], "weight": {**SCHEMES["w4a8_dynamic"]["weight"], "method": "ssz"}}
W8A8_HIST = {"act": {**SCHEMES["w8a8_static"]["act"], "method": "histogram"}, "weight": SCHEMES["w8a8_static"]["weight"]}


@pytest.mark.parametrize("qconfig", [W4_G16_GPTQ, W4A8_SSZ, W8A8_HIST], ids=["gptq", "ssz", "histogram"])
def test_methods_run_end_to_end_and_both_runners_agree(tiny_llama, tmp_path, qconfig):
    layer_wise, model_wise = outputs_of_both_runners(tiny_llama, tmp_path, _process(qconfig), "Llama-2-7B")
    assert layer_wise == model_wise
    load_ascendv1(tmp_path / "layer_wise")  # the reader accepts it


def test_gptq_without_calibration_data_is_reported(tiny_llama, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": _process(W4_G16_GPTQ), "dataset": small_calib(tmp_path)}}))
    run_quant(tiny_llama, tmp_path / "out", config)  # needs data: the dataset is read because of GPTQ
    assert (tmp_path / "out" / "quant_model_description.json").exists()
