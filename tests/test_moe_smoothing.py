"""Smoothing on MoE and MLA models (Qwen3-MoE, DeepSeek-V3), with the dense Llama as a regression: the
subgraphs each block resolves to, exactness in float for every smoothing processor (max |Δlogit| printed),
experts without tokens, the schemes the flex searches score against (learnt from the steps that follow), and
layer_wise = model_wise = dp_layer_wise bytes for the upstream-style recipe, which `msmodelslim check` accepts."""
import json
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import msmodelslim.processor.flex_smooth_quant.processor as flex_module
from helpers import SCHEMES, quantize_variants, run_quant, saved_tensors, shard_bytes, small_calib, write_pipeline
from msmodelslim.cli.__main__ import main
from msmodelslim.core.config import parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.families import DeepseekV3Adapter, Qwen3MoeAdapter
from msmodelslim.model.interface import (
    AttentionShape,
    MlaShape,
    SmoothSubgraph,
    dense_mlp_subgraphs,
    gqa_attention_subgraphs,
    moe_mlp_subgraphs,
)
from msmodelslim.model.registry import create_adapter
from msmodelslim.model.transformers_model import TransformersModel
from msmodelslim.processor.base import ProcessorContext, build_pipeline
from msmodelslim.processor.smooth_quant import scoring, smooth
from msmodelslim.processor.smooth_quant.scoring import OutputError, ScoredTarget
from msmodelslim.processor.smooth_quant.subgraphs import BlockSubgraph, block_subgraphs, resolve
from msmodelslim.quantizer.scheme import LinearQConfig
from tiny_models import make_tiny_model

MODEL_TYPE = {"llama": "Llama-2-7B", "qwen3_moe": "Qwen3-30B-A3B", "deepseek_v3": "DeepSeek-V3"}
MOE_LAYER = {"qwen3_moe": 1, "deepseek_v3": 1}
EXPERTS = "*.mlp.experts.*"
ATTENTION = "*self_attn*"
W4A8_SSZ = {**SCHEMES["w4a8_dynamic"], "weight": {**SCHEMES["w4a8_dynamic"]["weight"], "method": "ssz"}}
ALL_KINDS = ["norm-linear", "ov", "up-down"]
# Fixed exponents where a processor searches: exactness does not depend on the search (tested below and in
# test_smoothing_variants.py / test_awq.py), and a search over every subgraph costs minutes on a busy CPU.
STEPS = {
    "smooth_quant": {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ALL_KINDS},
    "iter_smooth": {"type": "iter_smooth"},
    "flex_smooth_quant": {"type": "flex_smooth_quant", "alpha": 0.6, "beta": 0.3, "act_scope": "per_token"},
    "flex_awq_ssz": {"type": "flex_awq_ssz", "alpha": 0.5, "beta": 0.2, "qconfig": W4A8_SSZ},
    "awq": {"type": "awq", "weight_qconfig": SCHEMES["w4a16_g16"]["weight"], "n_grid": 3},
}


def recipe_group() -> dict:
    """The upstream MoE W4A8 recipe's quantization: attention W8A8 static, routed experts W4A8_DYNAMIC (int4
    ssz), the dense and shared MLPs W8A8_DYNAMIC; lm_head (and the routers, which are no linears) float."""
    return {"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": [ATTENTION]},
        {"type": "linear_quant", "qconfig": W4A8_SSZ, "include": [EXPERTS]},
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head", ATTENTION, EXPERTS]}]}


def max_logit_change(source, smoothed_dir) -> float:
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    smoothed = load_ascendv1(smoothed_dir)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((original(input_ids=ids).logits - smoothed(input_ids=ids).logits).abs().max())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Tiny checkpoints whose norms have outlier channels, so that every scale is far from 1."""
    made = {}
    for family in MODEL_TYPE:
        source = make_tiny_model(tmp_path_factory.mktemp(family), family, seed=3)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 17]] *= 30
                layer.post_attention_layernorm.weight[5] *= 20
                attention = layer.self_attn
                if hasattr(attention, "q_a_layernorm"):
                    attention.q_a_layernorm.weight[2] *= 20
                    attention.kv_a_layernorm.weight[7] *= 20
        model.save_pretrained(source)
        made[family] = source
    return made


# ---- the subgraphs of a block ---------------------------------------------------------------------------------
def test_deepseek_blocks_resolve_dense_moe_and_mla_subgraphs(tiny_deepseek_v3):
    adapter = create_adapter("DeepSeek-V3", str(tiny_deepseek_v3), False)
    skeleton = adapter.init_skeleton()
    structure = adapter.structure.smooth_subgraphs
    dense = block_subgraphs(structure, skeleton.model.layers[0], "model.layers.0")
    sparse = block_subgraphs(structure, skeleton.model.layers[1], "model.layers.1")
    attention = [
        BlockSubgraph("norm-linear", "input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
        BlockSubgraph("norm-linear", "self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
        BlockSubgraph("norm-linear", "self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
        BlockSubgraph("ov", "self_attn.kv_b_proj", ("self_attn.o_proj",), layout="mla"),
    ]
    assert dense == attention + [BlockSubgraph("norm-linear", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                                 BlockSubgraph("up-down", "mlp.up_proj", ("mlp.down_proj",))]
    experts = [f"mlp.experts.{e}" for e in range(4)]
    readers = ("mlp.gate", *(f"{x}.gate_proj" for x in experts), *(f"{x}.up_proj" for x in experts),
               "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    assert sparse == attention + [BlockSubgraph("norm-linear", "post_attention_layernorm", readers)] + [
        BlockSubgraph("up-down", f"{x}.up_proj", (f"{x}.down_proj",), expert=e) for e, x in enumerate(experts)] + [
        BlockSubgraph("up-down", "mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",))]
    router = skeleton.model.layers[1].mlp.gate
    assert not isinstance(router, nn.Linear) and router.weight.shape == (4, 64)  # scaled as x·Wᵀ all the same


def test_builders_take_the_module_names_of_other_families():
    minimax = moe_mlp_subgraphs(mlp="block_sparse_moe", gate="w1", up="w3", down="w2")
    assert minimax[0] == SmoothSubgraph("norm-linear", "post_attention_layernorm", (
        "block_sparse_moe.gate", "block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"))
    assert minimax[1] == SmoothSubgraph("up-down", "block_sparse_moe.experts.*.w3", ("block_sparse_moe.experts.*.w2",))
    qwen3_next = moe_mlp_subgraphs(shared="shared_expert", extra_readers=("shared_expert_gate",))
    assert qwen3_next[0].targets[-3:] == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                          "mlp.shared_expert_gate")
    assert gqa_attention_subgraphs(readers=("qkv_proj",), value=None) == (
        SmoothSubgraph("norm-linear", "input_layernorm", ("self_attn.qkv_proj",)),)


def test_a_source_read_by_two_subgraphs_and_fused_experts_are_refused():
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.up_proj, block.mlp.down_proj, block.mlp.gate_proj = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8)
    block.post_attention_layernorm = nn.LayerNorm(4)
    twice = dense_mlp_subgraphs() + (SmoothSubgraph("norm-linear", "post_attention_layernorm", ("mlp.up_proj",)),)
    with pytest.raises(UnsupportedError, match="post_attention_layernorm is the source of two smoothing subgraphs"):
        block_subgraphs(twice, block, "model.layers.0")
    block.mlp.experts = nn.Linear(4, 4)  # not a list of per-expert modules
    with pytest.raises(UnsupportedError, match="must unfuse the experts"):
        resolve(moe_mlp_subgraphs()[1], block)
    block.mlp.experts = nn.ModuleList()
    assert resolve(moe_mlp_subgraphs()[0], block) == []  # the router is absent: skipped


def test_mla_value_rows_take_the_scale_and_key_rows_keep_one():
    shape = MlaShape(num_heads=3, qk_nope_head_dim=2, v_head_dim=4)
    s = torch.arange(1, 13, dtype=torch.float32)
    expected = []
    for head in range(3):  # slow reference: walk kv_b_proj's rows head by head
        expected += [1.0] * 2 + [float(s[head * 4 + d]) for d in range(4)]
    assert smooth.mla_value_rows(s, shape).tolist() == expected


# ---- exactness in float ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(MODEL_TYPE))
@pytest.mark.parametrize("step", list(STEPS))
def test_smoothing_alone_leaves_the_float_model_unchanged(planted, tmp_path, family, step):
    source, out = planted[family], tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [STEPS[step]], small_calib(tmp_path)), MODEL_TYPE[family])
    change = max_logit_change(source, out)
    print(f"\nmax |Δlogit| {family} {step}: {change:.3g}")
    assert change < 1e-4
    before, after = saved_tensors(source), saved_tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.input_layernorm.weight" in changed, "nothing was smoothed"
    if step == "awq":  # its grid holds α = 0 (s = 1), which a subgraph may pick: only exactness is certain
        return
    if family == "llama":
        assert {"model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"} <= changed
    if family in MOE_LAYER:
        layer = f"model.layers.{MOE_LAYER[family]}"
        # the router's columns take the norm's scale (routing unchanged); every expert's up -> down was smoothed
        assert {f"{layer}.mlp.gate.weight", f"{layer}.post_attention_layernorm.weight"} <= changed
        assert all(f"{layer}.mlp.experts.{e}.down_proj.weight" in changed for e in range(4))
        assert f"{layer}.self_attn.o_proj.weight" in changed
    if family == "deepseek_v3":
        assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                "model.layers.1.self_attn.kv_a_layernorm.weight", "model.layers.1.self_attn.q_a_layernorm.weight"} <= changed


def test_mla_ov_scales_only_the_value_rows_of_kv_b_proj(planted, tmp_path):
    source, out = planted["deepseek_v3"], tmp_path / "out"
    step = {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["ov"]}
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [step], small_calib(tmp_path)), "DeepSeek-V3")
    assert max_logit_change(source, out) < 1e-4
    before, after = saved_tensors(source), saved_tensors(out)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    rows_before, rows_after = before[name].reshape(4, 8 + 16, 16), after[name].reshape(4, 8 + 16, 16)  # [H, nope+v, r]
    assert torch.equal(rows_before[:, :8], rows_after[:, :8]), "key rows must keep scale 1"
    ratio = rows_before[:, 8:] / rows_after[:, 8:]  # the scale s per value row, the same across the row
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    o_ratio = after["model.layers.1.self_attn.o_proj.weight"] / before["model.layers.1.self_attn.o_proj.weight"]
    torch.testing.assert_close(o_ratio[0], ratio[..., 0].reshape(-1))  # o_proj's columns take the same s


def starve_expert(source, dest, layer: int, expert: int):
    """A copy of the DeepSeek checkpoint whose router never picks `expert` in `layer` (correction bias -1e4)."""
    shutil.copytree(source, dest)
    (weights,) = dest.glob("*.safetensors")
    state = load_file(weights)
    state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][expert] = -1e4
    save_file(state, weights, metadata={"format": "pt"})
    return dest


def test_an_expert_without_tokens_keeps_scale_one_and_is_counted(planted, tmp_path, log_lines):
    source = starve_expert(planted["deepseek_v3"], tmp_path / "starved", layer=1, expert=2)
    out = tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [STEPS["iter_smooth"]], small_calib(tmp_path)), "DeepSeek-V3")
    starved = [line for line in log_lines if "routed experts received no calibration tokens" in line]
    assert starved == ["model.layers.1: 1 of 4 routed experts received no calibration tokens; their iter_smooth "
                       "subgraphs (source mlp.experts.*.up_proj) keep scale 1"]
    before, after = saved_tensors(source), saved_tensors(out)
    down = "model.layers.1.mlp.experts.{}.down_proj.weight"
    assert torch.equal(before[down.format(2)], after[down.format(2)])
    assert not torch.equal(before[down.format(0)], after[down.format(0)])
    # its gate/up columns still take the norm's scale: the norm feeds every expert, picked or not
    assert not torch.equal(before["model.layers.1.mlp.experts.2.up_proj.weight"],
                           after["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert max_logit_change(source, out) < 1e-4


# ---- what the searches score against -------------------------------------------------------------------------
def _slow_error(x, weight, s, qconfig: LinearQConfig) -> tuple[float, float]:
    """(‖error‖², ‖reference‖²) of one target, computed row by row from the definitions."""
    xs, ws = x / s, weight * s
    if qconfig.act.scope.value == "per_token":
        rows = [r / (r.abs().max() / 127) for r in xs]
        xq = torch.stack([r.round().clamp(-128, 127) * (xs[i].abs().max() / 127) for i, r in enumerate(rows)])
    else:  # static asymmetric int8 over the whole sample
        lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
        scale = (hi - lo) / 255
        zero = -128 - round(lo / scale)
        xq = ((xs / scale).round() + zero).clamp(-128, 127).sub(zero) * scale
    levels = 2 ** (qconfig.weight.dtype.bits - 1) - 1
    wq = torch.stack([(r / (r.abs().max() / levels)).round().clamp(-levels - 1, levels) * (r.abs().max() / levels)
                      for r in ws])
    reference = x @ weight.T
    return float((xq @ wq.T - reference).pow(2).sum()), float(reference.pow(2).sum())


def test_mixed_scheme_error_matches_a_slow_reference(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(40, 16) * torch.linspace(0.2, 6, 16)
    static, w4a8 = LinearQConfig(**SCHEMES["w8a8_static"]), LinearQConfig(**W4A8_SSZ)
    targets = [ScoredTarget("a", torch.randn(8, 16), static), ScoredTarget("b", torch.randn(6, 16), w4a8),
               ScoredTarget("c", torch.randn(5, 16), w4a8)]
    s = torch.rand(16) + 0.5
    parts = [_slow_error(x, t.weight, s, t.qconfig) for t in targets]
    expected = math.sqrt(sum(p[0] for p in parts)) / math.sqrt(sum(p[1] for p in parts))
    assert OutputError(x, targets)(s) == pytest.approx(expected, rel=1e-3)
    monkeypatch.setattr(scoring, "CHUNK_ROWS", 1)  # one target per matmul: the same number
    assert OutputError(x, targets)(s) == pytest.approx(expected, rel=1e-3)


def context_for(adapter_class, mla=None) -> ProcessorContext:
    attention = None if mla else AttentionShape(4, 2, 16)
    return ProcessorContext(adapter_class.__name__, adapter_class.structure, attention, mla=mla)


def test_each_step_learns_the_schemes_that_follow_it(tiny_deepseek_v3):
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "flex_smooth_quant"},
        # (a rewrite may not precede another calibrating child in one group: the group refuses it)
        {"type": "group", "configs": [{"type": "flex_awq_ssz", "qconfig": W4A8_SSZ}]},
        recipe_group()]}})
    mla = MlaShape(4, 8, 16)
    flex, group, _ = build_pipeline(config.spec.process, context_for(DeepseekV3Adapter, mla))
    awq = group.children[0]
    layer = "model.layers.1"
    for processor in (flex, awq):  # inside a group: its later siblings, then the steps after the group
        scheme = lambda name: processor.scoring_qconfig(f"{layer}.{name}").scheme.value  # noqa: E731
        assert scheme("self_attn.q_a_proj") == "W8A8"
        assert processor.scoring_qconfig(f"{layer}.self_attn.q_a_proj").act.scope.value == "per_tensor"
        assert scheme("mlp.experts.3.up_proj") == "W4A8_DYNAMIC"
        assert scheme("mlp.shared_experts.up_proj") == "W8A8_DYNAMIC"
        assert processor.scoring_qconfig("lm_head") is None
    assert flex.context.following == awq.context.following == tuple(config.spec.process[2].configs)
    model = create_adapter("DeepSeek-V3", str(tiny_deepseek_v3), False).init_skeleton()
    block = model.model.layers[1]  # on the meta device: scoring decisions need no weight values
    names = ["mlp.gate", "mlp.experts.0.up_proj", "mlp.shared_experts.up_proj"]
    scored = flex.scored_targets([f"{layer}.{n}" for n in names], [block.get_submodule(n) for n in names])
    assert [(t.name, t.qconfig.scheme.value) for t in scored] == [
        (f"{layer}.mlp.experts.0.up_proj", "W4A8_DYNAMIC"), (f"{layer}.mlp.shared_experts.up_proj", "W8A8_DYNAMIC")]


def test_a_smoothing_only_run_says_what_it_assumes(log_lines):
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "flex_smooth_quant"}]}})
    (flex,) = build_pipeline(config.spec.process, context_for(Qwen3MoeAdapter))
    assert flex.scoring_qconfig("model.layers.0.self_attn.q_proj").scheme.value == "W8A8_DYNAMIC"
    assert any("no later step of spec.process quantizes" in line and "act_scope: per_tensor" in line
               for line in log_lines)


def _no_weight_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(TransformersModel, "load_weights", refuse)


def test_an_act_scope_that_contradicts_the_following_scheme_is_refused_before_any_weight(tiny_qwen3_moe, tmp_path,
                                                                                          monkeypatch):
    _no_weight_read(monkeypatch)
    process = [{"type": "flex_smooth_quant", "act_scope": "per_token"}, recipe_group()]
    with pytest.raises(ConfigError, match=r"act_scope per_token contradicts the W8A8 a later step gives "
                                          r"model\.layers\.0\.self_attn\.q_proj; remove act_scope"):
        run_quant(tiny_qwen3_moe, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", process, small_calib(tmp_path)),
                  "Qwen3-30B-A3B")
    assert not (tmp_path / "out").exists()


def test_subgraph_names_the_model_lacks_are_refused_before_any_weight(tiny_qwen3_moe, tmp_path, monkeypatch):
    _no_weight_read(monkeypatch)
    minimax_names = moe_mlp_subgraphs(mlp="block_sparse_moe", gate="w1", up="w3", down="w2")
    monkeypatch.setattr(Qwen3MoeAdapter, "structure", replace(Qwen3MoeAdapter.structure, smooth_subgraphs=minimax_names))
    with pytest.raises(UnsupportedError, match="iter_smooth: none of the 2 smoothing subgraphs adapter Qwen3MoeAdapter "
                                               "describes exists in this model's decoder blocks"):
        run_quant(tiny_qwen3_moe, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", [{"type": "iter_smooth"}],
                                                          small_calib(tmp_path)), "Qwen3-30B-A3B")


# ---- the upstream recipe: runners agree, and the output checks ----------------------------------------------------
SENTENCE = "Quantization maps floats to integers; apt installs package {i} on Debian. "


def varied_calib(tmp_path) -> str:
    """Eight samples of four lengths: four batches, so each of two ranks gets real data."""
    path = tmp_path / "varied.jsonl"
    path.write_text("\n".join(json.dumps({"text": SENTENCE.format(i=i) * (1 + i % 4)}) for i in range(8)))
    return str(path)


class SchemeSpy(OutputError):
    """Records which scheme every scored target of a search was scored with."""

    seen: dict[str, str] = {}

    def __init__(self, x, targets):
        super().__init__(x, targets)
        SchemeSpy.seen.update({t.name: t.qconfig.scheme.value for t in targets})


@pytest.fixture
def rank_threads():
    """This process computes with the thread count each of two CPU ranks uses (core/distributed.py): a matmul
    run with another count may differ in the last bit (seen on an expert's inputs), which is not what the
    comparison with dp_layer_wise is about."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("step", ["iter_smooth", "flex_smooth_quant"])
def test_recipe_runs_identically_on_every_runner_and_checks(moe_sources, tmp_path, monkeypatch, rank_threads, family,
                                                             step):
    source = moe_sources[family]
    SchemeSpy.seen = {}
    monkeypatch.setattr(flex_module, "OutputError", SchemeSpy)
    process = [{"type": step}, recipe_group()]
    outs = quantize_variants(source, tmp_path, process, MODEL_TYPE[family], {
        "layer_wise": ("layer_wise", DeviceSpec("cpu")), "model_wise": ("model_wise", DeviceSpec("cpu")),
        "dp": ("dp_layer_wise", DeviceSpec("cpu", (0, 1)))}, varied_calib(tmp_path))
    layer_wise, model_wise, dp = (shard_bytes(outs[k]) for k in ("layer_wise", "model_wise", "dp"))
    assert layer_wise and layer_wise == model_wise
    assert dp == layer_wise, "two ranks must write the single-process checkpoint"
    assert main(["check", str(outs["layer_wise"])]) == 0

    description = json.loads((outs["layer_wise"] / "quant_model_description.json").read_text())
    layer = f"model.layers.{MOE_LAYER[family]}"
    attention = "self_attn.q_proj" if family == "qwen3_moe" else "self_attn.q_a_proj"
    assert description[f"{layer}.{attention}.weight"] == "W8A8"
    assert description[f"{layer}.mlp.experts.0.up_proj.weight"] == "W4A8_DYNAMIC"
    assert description[f"{layer}.mlp.gate.weight"] == "FLOAT"
    if step == "flex_smooth_quant":  # the search scored each target with the scheme the group gives it
        seen = SchemeSpy.seen
        assert seen[f"{layer}.{attention}"] == "W8A8" and seen[f"{layer}.self_attn.o_proj"] == "W8A8"
        assert seen[f"{layer}.mlp.experts.0.up_proj"] == seen[f"{layer}.mlp.experts.1.down_proj"] == "W4A8_DYNAMIC"
        assert f"{layer}.mlp.gate" not in seen  # the router stays float: nothing to score
        if family == "deepseek_v3":
            assert seen[f"{layer}.mlp.shared_experts.up_proj"] == "W8A8_DYNAMIC"
            assert seen["model.layers.0.mlp.down_proj"] == "W8A8_DYNAMIC"
            assert seen[f"{layer}.self_attn.kv_b_proj"] == seen[f"{layer}.self_attn.q_b_proj"] == "W8A8"

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    # Text like the calibration set: static ranges and scales are fitted to it (random token ids of a random
    # tiny model light other channels, where any static range, smoothed or not, clips).
    ids = AutoTokenizer.from_pretrained(source)([SENTENCE.format(i=3) * 4], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        float_logits, quantized = original(input_ids=ids).logits, load_ascendv1(outs["layer_wise"])(input_ids=ids).logits
    drift = float((quantized - float_logits).norm() / float_logits.norm())
    print(f"\n{family} {step} + W8A8 attention / W4A8 experts: relative logit drift {drift:.4f}")
    assert drift < 0.3  # as test_moe.py's W4A8 bound: a perturbed hidden state can flip top-2 experts near a tie


@pytest.fixture(scope="module")
def moe_sources(tiny_qwen3_moe, tiny_deepseek_v3):
    return {"qwen3_moe": tiny_qwen3_moe, "deepseek_v3": tiny_deepseek_v3}
