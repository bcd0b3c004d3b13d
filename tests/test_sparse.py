"""Sparse quantization: weight method lowbit_sparse -> ascendv1 W8A8S, processor float_sparse (ADMM pruning) ->
W16A16S. Each algorithm against a slow reference, then both end to end: written, checked, read back by our
reader and the reference reader, refused by compressed-tensors, reachable through --quant_type."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, small_calib, saved_tensors
from msmodelslim.app.practice import select_practice
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.config import parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.ir.sparse_linear import SparseFloatLinear
from msmodelslim.quantizer.admm import admm_prune, magnitude_prune
from msmodelslim.quantizer.lowbit_sparse import code_statistics, lowbit_sparse_quantize
from msmodelslim.quantizer.mantissa import keep_mask, round_mantissa
from msmodelslim.quantizer.primitives import dequantize_weight, quantize_weight_minmax
from msmodelslim.quantizer.scheme import LinearQConfig, Scheme
from reference_reader import load_reference_model

STATIC = SCHEMES["w8a8_static"]["act"]
W8 = SCHEMES["w8a8_static"]["weight"]
SPARSE_W8 = {**W8, "method": "lowbit_sparse", "ext": {"w_bit": 4, "fraction": 0.02}}


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few planted outliers per row, as LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    spots = torch.randint(0, cols, (rows, 2), generator=g)
    w.scatter_(1, spots, torch.randn(rows, 2, generator=g).sign() * 0.3)
    return w


# ---- lowbit_sparse (W8A8S codes) ------------------------------------------------------------------------------
def slow_lowbit_sparse(w: torch.Tensor, w_bit: int, fraction: float, use_sigma: bool, sigma: float):
    """Row by row in plain Python: outliers, the bulk's range, the scale, round half to even."""
    codes, scales = [], []
    for row in w.double().tolist():
        k = len(row)
        if use_sigma:
            mean = sum(row) / k
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / (k - 1))
            outliers = {i for i, v in enumerate(row) if abs(v - mean) > sigma * std}
        else:
            count = min(math.ceil(fraction * k), k - 1)
            outliers = set(sorted(range(k), key=lambda i: -abs(row[i]))[:count])
        bulk = max((abs(v) for i, v in enumerate(row) if i not in outliers), default=0.0)
        scale = max(bulk / (2 ** (w_bit - 1) - 1), max(abs(v) for v in row) / 127)
        scales.append(scale)
        codes.append([max(-127, min(127, round(v / scale))) for v in row])
    return torch.tensor(codes, dtype=torch.int8), torch.tensor(scales, dtype=torch.float64)


@pytest.mark.parametrize("w_bit,fraction,use_sigma,sigma", [(4, 0.01, False, 3.0), (4, 0.05, False, 3.0),
                                                             (4, 0.0, False, 3.0), (4, 0.01, True, 3.0),
                                                             (3, 0.01, True, 4.0)])
def test_lowbit_sparse_codes_match_a_slow_reference(w_bit, fraction, use_sigma, sigma):
    w = heavy_tailed(12, 96, seed=1)
    q, scale, offset = lowbit_sparse_quantize(w, w_bit, fraction, use_sigma, sigma)
    ref_q, ref_scale = slow_lowbit_sparse(w, w_bit, fraction, use_sigma, sigma)
    torch.testing.assert_close(scale[:, 0].double(), ref_scale, rtol=1e-6, atol=0)
    mismatched = (q != ref_q).sum()  # a float32 division may land the other side of an exact .5 tie
    assert mismatched <= 1 and (q.int() - ref_q.int()).abs().max() <= 1
    assert q.dtype == torch.int8 and not offset.any() and q.abs().max() <= 127


def test_the_bulk_sits_on_the_low_bit_grid_and_only_outliers_leave_it():
    w = heavy_tailed(16, 128, seed=2)
    q, _, _ = lowbit_sparse_quantize(w, 4, fraction=0.02)
    outside_per_row = (q.abs() > 7).sum(dim=1)
    assert int(outside_per_row.max()) <= math.ceil(0.02 * 128)  # at most the protected outliers
    assert int(outside_per_row.min()) >= 1  # the planted ones are kept beyond the 4-bit range
    stats = code_statistics(q, 4)
    assert stats["zero"] > 0.05 and stats["outside_bulk"] <= math.ceil(0.02 * 128) / 128


def test_more_protected_outliers_means_fewer_zero_codes_and_less_error():
    w = heavy_tailed(32, 256, seed=3)
    zero, error = [], []
    for fraction in (0.0, 0.01, 0.05):
        q, s, o = lowbit_sparse_quantize(w, 4, fraction=fraction)
        zero.append(code_statistics(q)["zero"])
        error.append(float((dequantize_weight(q, s, o) - w).pow(2).sum()))
    assert zero[0] > zero[1] > zero[2] and error[0] > error[1] > error[2]
    int4 = dequantize_weight(*quantize_weight_minmax(w, 4, True))
    int8 = dequantize_weight(*quantize_weight_minmax(w, 8, True))
    # outliers in int8 beat a 4-bit grid stretched over them; a true 8-bit grid is finer still
    assert float((int8 - w).pow(2).sum()) < error[1] < float((int4 - w).pow(2).sum())


def test_lowbit_sparse_resolves_to_w8a8s_only_with_static_int8_activations():
    q = LinearQConfig.model_validate({"act": STATIC, "weight": SPARSE_W8})
    assert q.scheme == Scheme.W8A8S and q.static_act and q.needs_calibration
    for act in (SCHEMES["w8a8_dynamic"]["act"], {"dtype": "float", "method": "none"}):
        with pytest.raises(ValueError, match="lowbit_sparse writes W8A8S"):
            LinearQConfig.model_validate({"act": act, "weight": SPARSE_W8})
    with pytest.raises(ValueError, match="nonuniform: true .* not implemented yet"):
        LinearQConfig.model_validate({"act": STATIC, "weight": {**SPARSE_W8, "ext": {"nonuniform": True}}})
    with pytest.raises(ValueError, match="ext.w_bit .* from 2 to 7"):
        LinearQConfig.model_validate({"act": STATIC, "weight": {**SPARSE_W8, "ext": {"w_bit": 8}}})


# ---- ADMM pruning ---------------------------------------------------------------------------------------------
def correlated_problem(out: int, cols: int, tokens: int, seed: int):
    """Weights and calibration inputs whose features are correlated (where the ADMM update pays off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(out, cols, generator=g) * 0.05
    return w, x, x.T @ x


def slow_admm(w: np.ndarray, h: np.ndarray, ratio: float, iterations=20, mask_iterations=15, damp=0.1, rho=1.0):
    """The same iteration written plainly in float64: explicit solves, the mask from a full sort."""
    norm = np.sqrt(np.diag(h)) + 1e-8
    hn = h / np.outer(norm, norm)
    hn = hn + damp * np.mean(np.diag(hn)) * np.eye(len(hn))
    w0 = (w * norm).T
    target = hn @ w0
    system = hn + rho * np.eye(len(hn))
    cur, u = w0.copy(), np.zeros_like(w0)
    mask = np.ones_like(w0, dtype=bool)
    count = int(w0.size * ratio)
    for step in range(iterations):
        if step < mask_iterations:
            order = np.argsort(np.abs(cur + u), axis=None, kind="stable")
            mask = np.ones(w0.size, dtype=bool)
            mask[order[:count]] = False
            mask = mask.reshape(w0.shape)
        z = (cur + u) * mask
        u = u + cur - z
        cur = np.linalg.solve(system, target + rho * (z - u))
    return (((cur + u) * mask).T / norm), mask.T


def test_admm_matches_a_slow_reference():
    w, _, h = correlated_problem(10, 24, 400, seed=4)
    ours = admm_prune(w, h, 0.4)
    ref, ref_mask = slow_admm(w.double().numpy(), h.double().numpy(), 0.4)
    assert torch.equal(ours != 0, torch.from_numpy(ref_mask))
    torch.testing.assert_close(ours.double(), torch.from_numpy(ref), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_admm_reaches_exactly_the_requested_sparsity(ratio):
    w, _, h = correlated_problem(24, 48, 300, seed=5)
    pruned = admm_prune(w, h, ratio)
    assert int((pruned == 0).sum()) == int(w.numel() * ratio)


def test_admm_update_beats_magnitude_pruning_on_the_layer_output():
    w, x, h = correlated_problem(32, 64, 512, seed=6)
    error = lambda wp: float((x @ w.T - x @ wp.T).norm())  # noqa: E731
    for ratio in (0.3, 0.5):
        admm, magnitude = admm_prune(w, h, ratio), magnitude_prune(w, ratio)
        assert int((magnitude == 0).sum()) == int((admm == 0).sum())
        assert error(admm) < 0.7 * error(magnitude), ratio


# ---- short-mantissa rounding (the established float_sparse's last step) ---------------------------------------
def slow_round_mantissa(value: float, keep: bool) -> float:
    h = float(np.float16(value))
    if h == 0:
        return 0.0
    m, e = math.frexp(abs(h))
    m, e = m * 2, e - 1
    sign = math.copysign(1.0, h)
    if e < -14:
        return h if keep else 0.0
    if e < -8:
        return sign * (2.0 if m > 1.5 else 1.0) * 2.0 ** e
    if keep:
        return h
    return sign * (round(m * 4) / 4) * 2.0 ** e


def test_round_mantissa_matches_a_slow_reference_on_every_band():
    values = [0.0, -0.0, 1.0, 1.125, 1.375, -1.875, 0.3, -0.0123, 3.3e-3, 2.0 ** -10 * 1.4, 2.0 ** -12 * 1.6,
              -(2.0 ** -9) * 1.5, 2.0 ** -14, 2.0 ** -16, -(2.0 ** -20), 5.0e-5, 7.77, 2.0 ** -8 * 1.9]
    values += torch.randn(200, generator=torch.Generator().manual_seed(7)).mul(0.05).tolist()
    w = torch.tensor(values)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[1::3] = True
    ours = round_mantissa(w, keep)
    ref = torch.tensor([slow_round_mantissa(v, bool(k)) for v, k in zip(values, keep)])
    assert torch.equal(ours, ref)
    assert torch.equal(ours.to(torch.float16).float(), ours)  # representable in float16


def test_keep_mask_keeps_the_costliest_roundings():
    w = torch.randn(20, 50, generator=torch.Generator().manual_seed(8)) * 0.05
    importance = torch.rand(50, generator=torch.Generator().manual_seed(9)) + 0.1
    keep = keep_mask(w, importance, 0.02)
    metric = (w - round_mantissa(w)).abs() * importance.sqrt()
    assert int(keep.sum()) == int(w.numel() * 0.02 - 1) + 1  # 20 of 1000, no ties in random data
    assert float(metric[keep].min()) >= float(metric[~keep].max())


# ---- end to end ------------------------------------------------------------------------------------------------
def _config(path, process, save="ascendv1_saver"):
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "dataset": small_calib(path.parent), "save": [{"type": save}], "process": process}}))
    return path


def _linear(weight, exclude=("lm_head",)):
    return {"type": "linear_quant", "qconfig": {"act": STATIC, "weight": weight}, "exclude": list(exclude)}


def _readers_agree(out):
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_ascendv1(out)(input_ids=ids).logits
        reference = load_reference_model(out)(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_w8a8s_round_trip_is_the_static_w8a8_tensor_set(tiny_llama, tmp_path):
    sparse, static = tmp_path / "sparse", tmp_path / "static"
    report = run_quant(tiny_llama, sparse, _config(tmp_path / "sparse.yaml", [_linear(SPARSE_W8)]))
    run_quant(tiny_llama, static, _config(tmp_path / "static.yaml", [_linear(W8)]))
    description = json.loads((sparse / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8S"
    assert set(report.plan.values()) == {"W8A8S", "FLOAT"} and report.plan["lm_head"] == "FLOAT"
    a, b = saved_tensors(sparse), saved_tensors(static)
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
    layer = "model.layers.1.mlp.down_proj"
    assert {description[f"{layer}.{s}"] for s in ("weight", "quant_bias", "input_scale", "deq_scale")} == {"W8A8S"}
    torch.testing.assert_close(a[f"{layer}.input_scale"], b[f"{layer}.input_scale"])  # the same calibration
    codes = a[f"{layer}.weight"]
    bound = math.ceil(0.02 * codes.shape[1]) / codes.shape[1]  # the protected outliers per row, at most
    assert code_statistics(codes)["outside_bulk"] <= bound and int((codes == 0).sum()) > int(
        (b[f"{layer}.weight"] == 0).sum())
    findings = check_ascendv1(sparse)
    assert [f for f in findings if f.level == "error"] == []
    assert any("W8A8S only in its Atlas 300I (310P) registry" in f.message for f in findings)
    _readers_agree(sparse)
    module = load_ascendv1(sparse).get_submodule(layer)
    assert isinstance(module, QuantLinear) and module.scheme == Scheme.W8A8S and torch.equal(module.qweight, codes)


def test_w8a8s_is_refused_for_compressed_tensors_and_convert(tiny_llama, tmp_path, monkeypatch):
    from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors

    run_quant(tiny_llama, tmp_path / "w8a8s", _config(tmp_path / "a.yaml", [_linear(SPARSE_W8)]))
    with pytest.raises(UnsupportedError, match="W8A8S.*lowbit_sparse"):
        convert_ascendv1_to_compressed_tensors(tmp_path / "w8a8s", tmp_path / "ct")
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match="lowbit_sparse .* no compressed-tensors equivalent"):
        run_quant(tiny_llama, tmp_path / "ct2", _config(tmp_path / "b.yaml", [_linear(SPARSE_W8)], "compressed_tensors"))
    with pytest.raises(UnsupportedError, match="float_sparse .* no compressed-tensors equivalent"):
        run_quant(tiny_llama, tmp_path / "ct3", _config(tmp_path / "c.yaml", [{"type": "float_sparse"}],
                                                         "compressed_tensors"))


def test_float_sparse_writes_w16a16s_at_the_requested_sparsity(tiny_llama, tmp_path):
    out = tmp_path / "w16a16s"
    report = run_quant(tiny_llama, out, _config(tmp_path / "fs.yaml", [{"type": "float_sparse", "sparse_ratio": 0.3}]))
    decoder = [n for n in report.plan if n.startswith("model.layers.")]
    assert {report.plan[n] for n in decoder} == {"W16A16S"} and report.plan["lm_head"] == "FLOAT"  # [] = all
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W16A16S"
    tensors = saved_tensors(out)
    for name in decoder:
        w = tensors[f"{name}.weight"]
        assert description[f"{name}.weight"] == "W16A16S" and w.dtype == torch.float32  # the model's dtype
        zeros = int((w == 0).sum())
        # exactly the pruned ones, plus the few that the float16 rounding flushes (|w| < 2^-14)
        assert int(w.numel() * 0.3) <= zeros <= int(w.numel() * 0.3) + int((w.abs() < 2.0 ** -14).sum())
        assert torch.equal(w.to(torch.float16).float(), w)
    findings = check_ascendv1(out)
    assert [f for f in findings if f.level == "error"] == []
    assert any("no engine loads W16A16S" in f.message for f in findings)
    _readers_agree(out)
    module = load_ascendv1(out).get_submodule(decoder[0])
    zeros = int((module.weight == 0).sum())
    assert isinstance(module, SparseFloatLinear) and zeros >= int(module.weight.numel() * 0.3)


def test_float_sparse_include_exclude_and_double_match(tiny_llama, tmp_path):
    config = [{"type": "float_sparse", "sparse_ratio": 0.5, "include": ["*mlp*"], "exclude": ["*down_proj"]},
              _linear(W8, exclude=("lm_head", "*mlp*"))]
    report = run_quant(tiny_llama, tmp_path / "mixed", _config(tmp_path / "mixed.yaml", config))
    assert report.plan["model.layers.0.mlp.up_proj"] == "W16A16S"
    assert report.plan["model.layers.0.mlp.down_proj"] == "FLOAT"
    assert report.plan["model.layers.0.self_attn.q_proj"] == "W8A8"
    assert report.description["model_quant_type"] == "W8A8"
    _readers_agree(tmp_path / "mixed")
    with pytest.raises(ConfigError, match="matched by two rules"):
        run_quant(tiny_llama, tmp_path / "twice", _config(tmp_path / "twice.yaml",
                                                          [{"type": "float_sparse"}, _linear(SPARSE_W8)]))


def test_float_sparse_config_is_checked():
    with pytest.raises(ConfigError, match=r"spec.process\[0\].sparse_ratio"):
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "float_sparse", "sparse_ratio": 1.5}]}})
    with pytest.raises(ConfigError, match="float transforms .* must come before quantization"):
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "float_sparse"},
                                                                         {"type": "smooth_quant"}]}})


@pytest.mark.parametrize("quant_type,practice_id,scheme", [("w8a8s", "llama-w8a8s", "W8A8S"),
                                                            ("w16a16s", "llama-w16a16s", "W16A16S")])
def test_quant_type_shortcut_picks_the_sparse_practice(tiny_llama, tmp_path, quant_type, practice_id, scheme):
    chosen = select_practice("SmolLM2-135M-Instruct", "llama", quant_type)
    assert chosen.metadata.config_id == practice_id and chosen.metadata.label.is_sparse
    assert select_practice("Acme-7B", "acme", quant_type, allow_default=True).metadata.config_id == f"default-{quant_type}"
    report = quantize(QuantizeRequest(model_path=tiny_llama, save_path=tmp_path / "out", device=DeviceSpec("cpu"),
                                      model_type="SmolLM2-135M-Instruct", quant_type=quant_type))
    assert scheme in report.plan.values()


def test_eval_scores_both_sparse_types(tiny_llama, tmp_path):
    from msmodelslim.app.evaluate import evaluate

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: apt installs packages; quantization maps floats to integers."
                                for i in range(40)))
    for name, process in (("s8", [_linear(SPARSE_W8)]), ("s16", [{"type": "float_sparse"}])):
        run_quant(tiny_llama, tmp_path / name, _config(tmp_path / f"{name}.yaml", process))
        results = evaluate(tiny_llama, tmp_path / name, str(text), torch.device("cpu"), window=16, max_windows=4)
        assert math.isfinite(results["quantized"].perplexity) and results["quantized"].perplexity > 1
