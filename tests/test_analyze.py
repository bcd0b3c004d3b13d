"""`msmodelslim analyze`: each metric against a slow, obviously-correct reference computed here on the same inputs,
rankings of planted outliers, the CLI's early errors, and the files it writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import small_calib
from tiny_models import make_tiny_model
from msmodelslim.app.analysis_metrics import InputStatistics, kurtosis_score, quantile_score, std_score
from msmodelslim.app.analysis_report import AnalysisResult, exclude_entries, groups, top_names
from msmodelslim.app.analyze import AnalyzeRequest, analyze
from msmodelslim.cli.__main__ import main
from msmodelslim.cli.arguments import normalize_analyze_argv
from msmodelslim.processor.matching import select

MODEL_TYPE = "Llama-2-7B"
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}


# ---- references -------------------------------------------------------------------------------------------
def textbook(x: torch.Tensor) -> dict[str, float]:
    """The three linear metrics straight from their definitions, in float64 over every element."""
    x = x.double().flatten()
    max_abs = x.abs().max().item()
    centred = x - x.mean()
    variance = (centred ** 2).mean().item()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    return {"std": max_abs / math.sqrt(variance), "quantile": 2 * max_abs / 254 / (q3 - q1),
            "kurtosis": (centred ** 4).mean().item() / variance ** 2}


def float_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def calibration_batches(path: Path, calib: str) -> list[dict]:
    from msmodelslim.core.dataset import load_texts
    from msmodelslim.model.registry import create_adapter

    return create_adapter(MODEL_TYPE, str(path), False).handle_dataset(load_texts(calib), torch.device("cpu"))


@torch.no_grad()
def captured_linear_inputs(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every linear's inputs over all batches, from plain forwards of the whole float model."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1)))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for batch in batches:
        model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def fake_quant_w8(weight: torch.Tensor) -> torch.Tensor:
    """int8 symmetric per output channel, round to nearest: s = max|w_row| / 127."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def quantized_copy(block: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(block)
    with torch.no_grad():
        for m in clone.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(fake_quant_w8(m.weight))
    return clone


@torch.no_grad()
def reference_linear_mse_w8a16(model: nn.Module, batches: list[dict]) -> dict[str, dict[str, float]]:
    """{block: {linear: MSE between the float block's and the W8A16 block's outputs of that linear}}, each block
    fed the float model's inputs (captured with kwargs from whole-model forwards)."""
    layers = model.model.layers
    inputs: dict[int, list] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, a, k, i=i: inputs.setdefault(i, []).append((a, k)),
                                             with_kwargs=True) for i, layer in enumerate(layers)]
    for batch in batches:
        model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    scores = {}
    for i, layer in enumerate(layers):
        quant = quantized_copy(layer)
        sums: dict[str, list[float]] = {}
        for args, kwargs in inputs[i]:
            outs = {}
            for tag, block in (("f", layer), ("q", quant)):
                hs = [m.register_forward_hook(lambda _m, _a, o, n=n, t=tag: outs.__setitem__((t, n), o))
                      for n, m in block.named_modules() if isinstance(m, nn.Linear)]
                block(*args, **kwargs)
                for h in hs:
                    h.remove()
            for n in {n for _, n in outs}:
                d = (outs[("f", n)].double() - outs[("q", n)].double()) ** 2
                acc = sums.setdefault(n, [0.0, 0])
                acc[0] += d.sum().item()
                acc[1] += d.numel()
        scores[f"model.layers.{i}"] = {n: s / c for n, (s, c) in sums.items()}
    return scores


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@torch.no_grad()
def reference_model_wise_w8a16(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Per block: the MSE of the final logits with only that block's weights in W8A16."""
    reference = [model(**b, use_cache=False).logits for b in batches]
    scores = {}
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = quantized_copy(layer)
        total, count = 0.0, 0
        for batch, logits in zip(batches, reference):
            d = (model(**batch, use_cache=False).logits.double() - logits.double()) ** 2
            total, count = total + d.sum().item(), count + d.numel()
        model.model.layers[i] = layer
        scores[f"model.layers.{i}"] = total / count
    return scores


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("analyze") / "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    return small_calib(tmp_path_factory.mktemp("calib"))


def planted(source: Path, dest: Path, edit) -> Path:
    """A copy of the tiny checkpoint with `edit(state)` applied to its tensors."""
    import shutil

    shutil.copytree(source, dest)
    file = dest / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return dest


def run(tmp_path: Path, model: Path, calib: str, scope: str, **kwargs) -> AnalysisResult:
    return analyze(AnalyzeRequest(scope, MODEL_TYPE, model, calib_dataset=calib, output=tmp_path / "out", **kwargs))


def w8a16_config(tmp_path: Path) -> Path:
    path = tmp_path / "w8a16.yaml"
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "linear_quant", "qconfig": {"weight": W8}, "exclude": ["lm_head"]}]}}))
    return path


# ---- metrics ----------------------------------------------------------------------------------------------
def test_streamed_statistics_equal_the_textbook_formulas():
    torch.manual_seed(0)
    chunks = [torch.randn(3, 7, 16) * 0.5 + 0.2, torch.randn(5, 16) ** 3, torch.randn(2, 9, 16) * 4]
    stats = InputStatistics(keep_values=True)
    for chunk in chunks:
        stats.update(chunk)
    expected = textbook(torch.cat([c.reshape(-1) for c in chunks]))
    assert std_score(stats) == pytest.approx(expected["std"], rel=1e-9)
    assert quantile_score(stats) == pytest.approx(expected["quantile"], rel=1e-6)
    assert kurtosis_score(stats) == pytest.approx(expected["kurtosis"], rel=1e-9)
    assert 2.5 < textbook(torch.randn(200_000))["kurtosis"] < 3.5  # the definition's Gaussian value (3)


@pytest.mark.parametrize("metric", ["std", "quantile", "kurtosis"])
def test_linear_scope_matches_reference_on_captured_inputs(tmp_path, tiny, calib, metric):
    result = run(tmp_path, tiny, calib, "linear", metric=metric)
    inputs = captured_linear_inputs(float_model(tiny), calibration_batches(tiny, calib))
    got = dict(result.scores)
    assert set(got) == set(inputs) and len(got) == 3 * 7
    for name, x in inputs.items():
        assert got[name] == pytest.approx(textbook(x)[metric], rel=1e-4), name


def test_pattern_filters_linears(tmp_path, tiny, calib):
    result = run(tmp_path, tiny, calib, "linear", patterns=("*down_proj",))
    assert sorted(n for n, _ in result.scores) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


@pytest.mark.parametrize("metric", ["std", "kurtosis"])
def test_outlier_channel_ranks_first(tmp_path, tiny, calib, metric):
    def edit(state):  # channel 5 of block 1's MLP input x40: an outlier channel for gate_proj and up_proj
        state["model.layers.1.post_attention_layernorm.weight"][5] *= 40

    model = planted(tiny, tmp_path / "outlier", edit)
    result = run(tmp_path, model, calib, "linear", metric=metric, topk=1)
    assert set(result.top) == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}  # one input: a tie
    assert result.scores[1][1] > result.scores[2][1]


def test_layer_wise_mse_matches_reference(tmp_path, tiny, calib):
    result = run(tmp_path, tiny, calib, "layer", config_path=w8a16_config(tmp_path))
    expected = {b: mean(per_linear.values()) for b, per_linear in
                reference_linear_mse_w8a16(float_model(tiny), calibration_batches(tiny, calib)).items()}
    got = dict(result.scores)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert value > 0 and got[name] == pytest.approx(value, rel=1e-4), name


def test_model_wise_mse_matches_reference(tmp_path, tiny, calib):
    result = run(tmp_path, tiny, calib, "layer", metric="mse_model_wise", config_path=w8a16_config(tmp_path))
    expected = reference_model_wise_w8a16(float_model(tiny), calibration_batches(tiny, calib))
    got = dict(result.scores)
    for name, value in expected.items():
        assert value > 0 and got[name] == pytest.approx(value, rel=1e-3), name


@pytest.mark.parametrize("scheme", [{}, {"quant_type": "w8a8"}, {"quant_type": "w8a16"}])
def test_large_weights_rank_their_block_first(tmp_path, tiny, calib, scheme):
    def edit(state):  # block 2's MLP weights x30: 30x the rounding error, in absolute terms
        for proj in ("gate_proj", "up_proj", "down_proj"):
            state[f"model.layers.2.mlp.{proj}.weight"] *= 30

    model = planted(tiny, tmp_path / "big", edit)
    result = run(tmp_path, model, calib, "layer", topk=1, **scheme)
    assert result.top == ["model.layers.2"], result.scores
    assert result.exclude == ["model.layers.2.*"]


def test_quant_modules_limits_what_is_quantized(tmp_path, tiny, calib):
    config = w8a16_config(tmp_path)
    result = run(tmp_path, tiny, calib, "layer", config_path=config, quant_modules=("*self_attn*",))
    # attention runs before the MLP, so its 4 linears' outputs are the same whether or not the MLP is quantized:
    # the score is the reference's mean over those 4, and the MLP's error is not in it
    reference = reference_linear_mse_w8a16(float_model(tiny), calibration_batches(tiny, calib))
    got = dict(result.scores)
    for block, per_linear in reference.items():
        attention = mean(v for n, v in per_linear.items() if n.startswith("self_attn."))
        assert got[block] == pytest.approx(attention, rel=1e-4), block
        assert got[block] != pytest.approx(mean(per_linear.values()), rel=1e-2)


def test_attention_scope_scores_every_attention(tmp_path, tiny, calib):
    result = run(tmp_path, tiny, calib, "attn")
    assert sorted(n for n, _ in result.scores) == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all(s > 0 for _, s in result.scores)


# ---- ranking and output -----------------------------------------------------------------------------------
def test_ties_are_grouped_and_never_split_at_k():
    ranked = [("a", 3.0), ("b", 2.0), ("c", 2.0), ("d", 1.0)]
    assert groups(ranked) == [(3.0, ["a"]), (2.0, ["b", "c"]), (1.0, ["d"])]
    assert top_names(ranked, 2) == ["a", "b", "c"]
    assert top_names(ranked, 1) == ["a"]
    assert exclude_entries(["model.layers.3"], "layer") == ["model.layers.3.*"]


def test_exclude_entries_select_exactly_the_block(tmp_path, tiny, calib):
    result = run(tmp_path, tiny, calib, "layer", topk=1)
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.down_proj")]
    kept = select(names, ["*"], result.exclude)
    block = result.top[0]
    assert sorted(set(names) - set(kept)) == sorted(n for n in names if n.startswith(block + "."))


def test_cli_writes_json_yaml_and_png(tmp_path, tiny, calib, capsys):
    out = tmp_path / "cli"
    rc = main(["analyze", "layer", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--calib_dataset", calib, "--topk", "2", "--output", str(out)])
    assert rc == 0
    document = json.loads((out / "analysis.json").read_text())
    assert document["scope"] == "layer" and document["metric"] == "mse_layer_wise"
    assert "MXFP4" in document["scheme"]
    scores = [s["score"] for s in document["scores"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    excluded = yaml.safe_load((out / "exclude.yaml").read_text())["exclude"]
    assert excluded == [f"{s['name']}.*" for s in document["scores"][:2]] == document["exclude"]
    assert "model.layers." in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scope_defaults_to_linear_and_legacy_attention_mse():
    assert normalize_analyze_argv(["analyze", "--model_type", "x"])[0] == ["analyze", "linear", "--model_type", "x"]
    legacy = ["analyze", "--metrics", "attention_mse", "--pattern", "a", "b", "--topk", "3"]
    argv, notes = normalize_analyze_argv(legacy)
    assert argv == ["analyze", "attn", "--metrics", "mse", "--topk", "3"] and len(notes) == 2
    assert normalize_analyze_argv(["quant", "--x"]) == (["quant", "--x"], [])


@pytest.fixture
def no_weight_read(monkeypatch):
    from msmodelslim.model.transformers_model import TransformersModel

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the error")

    monkeypatch.setattr(TransformersModel, "_materialise", refuse)


@pytest.mark.parametrize("extra, expected", [
    (["--metrics", "entropy"], "not a metric of the linear scope"),
    (["--metrics", "mse_layer_wise"], "belongs to 'analyze layer'"),
    (["--topk", "0"], "--topk must be a positive integer"),
    (["--pattern", "*nothing*"], "selects no linear"),
    (["--quant_type", "w8a8"], "choose the scheme of 'analyze layer'"),
    (["--calib_dataset", "data.txt"], "must be a .json or .jsonl"),
    (["--calib_dataset", "missing.jsonl"], "not found"),
])
def test_cli_refuses_bad_input_before_reading_weights(tiny, capsys, no_weight_read, extra, expected):
    rc = main(["analyze", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu", *extra])
    assert rc != 0
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["analyze", "layer", "--model_path", "/nonexistent/model"], "is not a directory"),
    (["analyze", "layer", "--model_type", "NoSuchModel-7B"], "NoSuchModel-7B"),
    (["analyze", "layer", "--quant_modules", "*nothing*"], "selects no linear"),
    (["analyze", "layer", "--quant_type", "w3a3"], "not valid"),
    (["analyze", "attn", "--metrics", "kurtosis"], "belongs to 'analyze linear'"),
])
def test_cli_layer_and_attn_errors(tiny, capsys, no_weight_read, argv, expected):
    full = list(argv)
    if "--model_path" not in full:
        full += ["--model_path", str(tiny)]
    if "--model_type" not in full:
        full += ["--model_type", MODEL_TYPE]
    assert main(full + ["--device", "cpu"]) != 0
    assert expected in capsys.readouterr().err


def test_layer_scheme_with_rotation_is_refused(tmp_path, tiny, capsys, no_weight_read):
    config = tmp_path / "quarot.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "quarot"}, {"type": "linear_quant", "qconfig": {"weight": W8}}]}}))
    rc = main(["analyze", "layer", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--config_path", str(config)])
    assert rc != 0 and "quarot" in capsys.readouterr().err


def test_output_that_is_a_file_is_refused_before_reading_weights(tmp_path, tiny, capsys, no_weight_read):
    target = tmp_path / "taken"
    target.write_text("x")
    rc = main(["analyze", "layer", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--output", str(target)])
    assert rc != 0 and "is not a directory" in capsys.readouterr().err


def test_moe_experts_are_scored_through_their_moe_output(tmp_path, calib):
    """A quantized block may route tokens to other experts, so an expert's outputs cannot be compared row by row:
    the MoE module's output (per token, routing included) stands for its experts."""
    from msmodelslim.app.analyze import _scored_outputs
    from msmodelslim.model.registry import create_adapter

    model = make_tiny_model(tmp_path / "moe", family="qwen3_moe")
    skeleton = create_adapter("Qwen3-30B-A3B", str(model), False).init_skeleton()
    block = skeleton.get_submodule("model.layers.0")
    linears = [f"model.layers.0.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    scored = _scored_outputs(skeleton, "model.layers.0", linears)
    assert "model.layers.0.mlp" in scored and not any(".experts." in n for n in scored)
    assert "model.layers.0.self_attn.q_proj" in scored
    result = analyze(AnalyzeRequest("layer", "Qwen3-30B-A3B", model, calib_dataset=calib, quant_type="w8a8",
                                    output=tmp_path / "out"))
    assert sorted(n for n, _ in result.scores) == ["model.layers.0", "model.layers.1"]
    assert all(0 < s < 1 for _, s in result.scores)
