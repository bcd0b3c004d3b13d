"""Smoothing and QuaRot on the GQA mixture-of-experts families of model/glm.py (glm4_moe), minimax.py (minimax_m2)
and qwen_next.py (qwen3_next): every smoothing processor and quarot leave the float model's logits unchanged (max
|Δlogit| printed), a structure that forgets a reader (or Qwen3-Next's norm offset, or that rotates its gated value
heads) is caught by the same measurement, layer_wise and model_wise write the same bytes, the upstream-style
recipes pass `msmodelslim check`, and GLM-4.5's MTP layer rotated from its tensors predicts what it predicted."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.glm4_moe.modeling_glm4_moe import (Glm4MoeDecoderLayer, Glm4MoeRMSNorm,
                                                            Glm4MoeRotaryEmbedding)

from helpers import SCHEMES, outputs_of_both_runners, run_quant, saved_tensors, small_calib, write_pipeline
from msmodelslim.cli.__main__ import main
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.glm import Glm4MoeAdapter
from msmodelslim.model.interface import SmoothSubgraph
from msmodelslim.model.minimax import MiniMaxM2Adapter
from msmodelslim.model.moe import unfuse_experts
from msmodelslim.model.qwen_next import Qwen3NextAdapter
from msmodelslim.model.registry import create_adapter
from msmodelslim.model.rotation import HeadRotation
from msmodelslim.model.step import Step35FlashAdapter
from msmodelslim.processor.base import ProcessorContext
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.quarot.processor import QuaRotProcessor
from tiny_models import make_tiny_model

MODEL_TYPE = {"glm4_moe": "GLM-4.5", "minimax_m2": "MiniMax-M2.7", "qwen3_next": "Qwen3-Next-80B-A3B-Instruct",
              "step3p5": "Step-3.5-Flash"}
ADAPTER = {"glm4_moe": Glm4MoeAdapter, "minimax_m2": MiniMaxM2Adapter, "qwen3_next": Qwen3NextAdapter,
           "step3p5": Step35FlashAdapter}
# a layer with full attention and a sparse MLP (Qwen3-Next: layers 0-2 are linear attention)
LAYER = {"glm4_moe": "model.layers.1", "minimax_m2": "model.layers.1", "qwen3_next": "model.layers.3",
         "step3p5": "model.layers.2"}
# that layer's MoE block, on disk and in the output
MOE = {"glm4_moe": "model.layers.1.mlp", "minimax_m2": "model.layers.1.block_sparse_moe",
       "qwen3_next": "model.layers.3.mlp", "step3p5": "model.layers.2.moe"}
EXPERT_DOWN = {"glm4_moe": "down_proj", "minimax_m2": "w2", "qwen3_next": "down_proj", "step3p5": "down_proj"}
# Step-3.5 describes norm -> reader subgraphs only (clamped SwiGLU, per-layer head counts: model/step.py)
NORM_ONLY = {"step3p5"}
ALL_KINDS = ["norm-linear", "ov", "up-down"]
W4A8_SSZ = {**SCHEMES["w4a8_dynamic"], "weight": {**SCHEMES["w4a8_dynamic"]["weight"], "method": "ssz"}}
# Fixed exponents where a processor searches: exactness does not depend on the search (test_moe_smoothing.py)
STEPS = {
    "smooth_quant": {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ALL_KINDS},
    "iter_smooth": {"type": "iter_smooth"},
    "flex_smooth_quant": {"type": "flex_smooth_quant", "alpha": 0.6, "beta": 0.3, "act_scope": "per_token"},
    "flex_awq_ssz": {"type": "flex_awq_ssz", "alpha": 0.5, "beta": 0.2, "qconfig": W4A8_SSZ},
    "awq": {"type": "awq", "weight_qconfig": SCHEMES["w4a16_g16"]["weight"], "n_grid": 3},
}
ATTENTION = "*self_attn*"
W8A8_DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}
UPSTREAM_GROUP = {"type": "group", "configs": [  # attention W8A8 static, the rest W8A8 dynamic
    {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": [ATTENTION]},
    {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head", ATTENTION]}]}
BOUND = 1e-4


def plant(source):
    """Norm gains away from 1 with outlier channels (every scale far from 1, a missing fold visible), routers
    with decisive logits and non-zero correction biases, saved back in the checkpoint's own layout."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("layernorm.weight"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
                tensor[[3, 17] if "input" in name else [5]] *= 20
            elif name.endswith("mlp.gate.weight"):
                tensor.normal_(0, 0.3, generator=g)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.rand(tensor.shape, generator=g))
    model.save_pretrained(source)
    return source


def plant_published(source, router: str = "moe.gate.weight"):
    """plant() on the checkpoint's tensors as they are stored (layouts transformers does not save: Step-3.5's,
    LongCat's per-expert one): norms (`input_layernorm.weight`, LongCat's `input_layernorm.0.weight`) get gains
    away from 1 with outlier channels, routers (`router`: the suffix of their weights) decisive logits."""
    (weights,) = source.glob("*.safetensors")
    state, g = load_file(weights), torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if "layernorm" in name and name.endswith("weight"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            tensor[[3, 17] if "input" in name else [5]] *= 20
        elif name.endswith(router):
            tensor.normal_(0, 0.3, generator=g)
    save_file(state, weights, metadata={"format": "pt"})
    return source


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {family: (plant_published if family == "step3p5" else plant)(
        make_tiny_model(tmp_path_factory.mktemp(family), family, seed=3)) for family in MODEL_TYPE}


def float_model(source, family: str):
    """The float model: transformers' own from the checkpoint; for Step-3.5 (no transformers class reads its
    published layout) the adapter's float load, which test_families_text.py checks against transformers'."""
    if family == "step3p5":
        return create_adapter(MODEL_TYPE[family], str(source), False).init_model(torch.device("cpu"), True).eval()
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def step_for(family: str, step: str) -> dict:
    config = STEPS[step]
    if family in NORM_ONLY and "enable_subgraph_type" in config:
        return {**config, "enable_subgraph_type": ["norm-linear"]}
    return config


def max_logit_change(source, out, family: str) -> tuple[float, float]:
    """(max |Δlogit|, max |logit|) of the output read back against the float source."""
    original = float_model(source, family)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        return float((expected - load_ascendv1(out)(input_ids=ids).logits).abs().max()), float(expected.abs().max())


def report(capsys, what: str, change: float, scale: float) -> None:
    with capsys.disabled():
        print(f"\n{what}: max |Δlogit| {change:.3g} (max |logit| {scale:.3g})")


# ---- exactness in float ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(MODEL_TYPE))
@pytest.mark.parametrize("step", list(STEPS))
def test_smoothing_alone_leaves_the_float_model_unchanged(sources, tmp_path, capsys, family, step):
    source, out = sources[family], tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [step_for(family, step)], small_calib(tmp_path)),
              MODEL_TYPE[family])
    change, scale = max_logit_change(source, out, family)
    report(capsys, f"{family} {step}", change, scale)
    assert change < BOUND * scale
    before, after = saved_tensors(source), saved_tensors(out)
    # (Step-3.5's stacked experts are written per expert: compared by name where both have one)
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    layer, moe = LAYER[family], MOE[family]
    assert f"{layer}.input_layernorm.weight" in changed, "nothing was smoothed"
    if step == "awq":  # its grid holds α = 0 (s = 1), which a subgraph may pick: only exactness is certain
        return
    # the router's columns took the norm's scale (routing unchanged); every expert's up -> down was smoothed
    assert {f"{moe}.gate.weight", f"{layer}.post_attention_layernorm.weight"} <= changed
    if family in NORM_ONLY:
        assert {f"{layer}.self_attn.g_proj.weight", f"{moe}.share_expert.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight"} <= changed
        assert not {f"{layer}.self_attn.o_proj.weight", f"{moe}.share_expert.down_proj.weight"} & changed
        return
    assert f"{layer}.self_attn.o_proj.weight" in changed
    assert all(f"{moe}.experts.{e}.{EXPERT_DOWN[family]}.weight" in changed for e in range(4))
    if family == "glm4_moe":  # the shared expert, and the dense first layer
        assert {f"{moe}.shared_experts.down_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.post_attention_layernorm.weight"} <= changed
    if family == "qwen3_next":  # the linear attention's readers, the shared expert and its gate
        assert {"model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.in_proj_ba.weight",
                f"{moe}.shared_expert_gate.weight", f"{moe}.shared_expert.down_proj.weight"} <= changed


@pytest.mark.parametrize("family", list(MODEL_TYPE))
def test_rotation_alone_leaves_the_float_model_unchanged(sources, tmp_path, capsys, family):
    source, out = sources[family], tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), MODEL_TYPE[family])
    change, scale = max_logit_change(source, out, family)
    report(capsys, f"{family} quarot", change, scale)
    assert change < BOUND * scale
    before, after = saved_tensors(source), saved_tensors(out)
    layer, moe = LAYER[family], MOE[family]
    expert = f"{moe}.share_expert.down_proj.weight" if family == "step3p5" else f"{moe}.experts.2.{EXPERT_DOWN[family]}.weight"
    for name in (f"{moe}.gate.weight", expert,
                 f"{layer}.self_attn.v_proj.weight", f"{layer}.self_attn.o_proj.weight"):
        assert not torch.allclose(before[name], after[name]), f"{name} was not rotated"
    if family == "qwen3_next":
        for name in ("model.layers.0.linear_attn.in_proj_ba.weight", "model.layers.0.linear_attn.out_proj.weight",
                     f"{moe}.shared_expert_gate.weight"):
            assert not torch.allclose(before[name], after[name]), f"{name} was not rotated"


# ---- the measurement catches a structure that forgets a reader ----------------------------------------------------
def without(reader: str, subgraphs: tuple[SmoothSubgraph, ...]) -> tuple[SmoothSubgraph, ...]:
    return tuple(replace(g, targets=tuple(t for t in g.targets if t != reader)) for g in subgraphs)


FORGOTTEN = [("glm4_moe", "mlp.gate"), ("minimax_m2", "block_sparse_moe.gate"), ("qwen3_next", "mlp.gate"),
             ("qwen3_next", "mlp.shared_expert_gate"), ("qwen3_next", "linear_attn.in_proj_ba"),
             ("step3p5", "moe.gate"), ("step3p5", "self_attn.g_proj")]


@pytest.mark.parametrize("family, reader", FORGOTTEN)
def test_a_structure_that_forgets_a_reader_changes_the_logits(sources, tmp_path, monkeypatch, capsys, family, reader):
    adapter = ADAPTER[family]
    described = adapter.structure.smooth_subgraphs
    assert without(reader, described) != described
    monkeypatch.setattr(adapter, "structure", replace(adapter.structure, smooth_subgraphs=without(reader, described)))
    source, out = sources[family], tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [step_for(family, "smooth_quant")], small_calib(tmp_path)),
              MODEL_TYPE[family])
    change, scale = max_logit_change(source, out, family)
    report(capsys, f"{family} smooth_quant WITHOUT {reader} (must break)", change, scale)
    assert change > 100 * BOUND * scale


def test_qwen3_next_smoothing_needs_the_norm_offset(sources, tmp_path, monkeypatch, capsys):
    """Its norms scale by (1 + w): dividing w instead of 1 + w by s changes the model."""
    monkeypatch.setattr(Qwen3NextAdapter, "structure", replace(Qwen3NextAdapter.structure, norm_offset=0.0))
    source, out = sources["qwen3_next"], tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [STEPS["smooth_quant"]], small_calib(tmp_path)),
              MODEL_TYPE["qwen3_next"])
    change, scale = max_logit_change(source, out, "qwen3_next")
    report(capsys, "qwen3_next smooth_quant WITHOUT norm_offset (must break)", change, scale)
    assert change > 100 * BOUND * scale


def test_qwen3_next_value_heads_do_not_rotate_through_the_output_gate(sources, tmp_path, monkeypatch, capsys):
    """Why the full attention has no value-head rotation: with one, the sigmoid gate breaks exactness."""
    rotation = Qwen3NextAdapter.structure.rotation
    assert rotation.heads == ()
    with_heads = replace(rotation, heads=(HeadRotation("self_attn.v_proj", "self_attn.o_proj"),))
    monkeypatch.setattr(Qwen3NextAdapter, "structure", replace(Qwen3NextAdapter.structure, rotation=with_heads))
    source, out = sources["qwen3_next"], tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), MODEL_TYPE["qwen3_next"])
    change, scale = max_logit_change(source, out, "qwen3_next")
    report(capsys, "qwen3_next quarot WITH value-head rotation (must break)", change, scale)
    assert change > 100 * BOUND * scale


# ---- runners agree; the upstream-style recipes pass the format check ----------------------------------------------
@pytest.mark.parametrize("family", list(MODEL_TYPE))
@pytest.mark.parametrize("first", ["iter_smooth", "quarot"])
def test_layer_wise_equals_model_wise(sources, tmp_path, family, first):
    layer_wise, model_wise = outputs_of_both_runners(sources[family], tmp_path, [{"type": first}, W8A8_DYNAMIC],
                                                     MODEL_TYPE[family])
    assert layer_wise and layer_wise == model_wise


@pytest.mark.parametrize("family", list(MODEL_TYPE))
def test_flex_smooth_quant_then_static_attention_checks(sources, tmp_path, family):
    source, out = sources[family], tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "flex_smooth_quant"}, UPSTREAM_GROUP],
                                 small_calib(tmp_path)), MODEL_TYPE[family])
    assert main(["check", str(out)]) == 0


def test_minimax_quarot_then_w8a8_dynamic_checks(sources, tmp_path, capsys):
    source, out = sources["minimax_m2"], tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [{"type": "quarot"}, W8A8_DYNAMIC]), MODEL_TYPE["minimax_m2"])
    assert main(["check", str(out)]) == 0
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, ours = original(input_ids=ids).logits, load_ascendv1(out)(input_ids=ids).logits
    drift = float((ours - expected).norm() / expected.norm())
    with capsys.disabled():
        print(f"\nminimax_m2 quarot + W8A8 dynamic: relative logit error vs float {drift:.4f}")
    assert drift < 0.1


# ---- GLM-4.5's multi-token-prediction layer (DeepSeek-V3's names around a GLM decoder layer) -----------------------
class GlmMtp(nn.Module):
    """GLM-4.5's MTP layer built by hand around transformers' GLM decoder layer, with the checkpoint's names
    (`model.layers.<n>.{enorm, hnorm, eh_proj, shared_head.*, embed_tokens}` next to the decoder's own)."""

    def __init__(self, config, index: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer = Glm4MoeDecoderLayer(config, index)
        unfuse_experts(self.layer)
        self.layer.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layer.enorm, self.layer.hnorm = Glm4MoeRMSNorm(h, eps), Glm4MoeRMSNorm(h, eps)
        self.layer.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layer.shared_head = nn.Module()
        self.layer.shared_head.norm = Glm4MoeRMSNorm(h, eps)
        self.layer.shared_head.head = nn.Linear(h, config.vocab_size, bias=False)
        self.rotary = Glm4MoeRotaryEmbedding(config)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        m = self.layer
        x = m.eh_proj(torch.cat([m.enorm(m.embed_tokens(next_ids)), m.hnorm(hidden)], dim=-1))
        x = m(x, attention_mask=None, position_embeddings=self.rotary(x, torch.arange(x.shape[1])[None]))
        return m.shared_head.head(m.shared_head.norm(x))


def test_glm_mtp_layer_rotated_from_its_tensors_predicts_what_it_predicted(sources, capsys):
    adapter = create_adapter(MODEL_TYPE["glm4_moe"], str(sources["glm4_moe"]), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    config, index = model.config, model.config.num_hidden_layers
    prefix = f"model.layers.{index}."
    torch.manual_seed(11)
    mtp = GlmMtp(config, index).eval()
    with torch.no_grad():
        for p in mtp.parameters():
            p.copy_(0.5 + torch.rand(p.shape)) if p.dim() == 1 else p.normal_(0, 0.08)
    tensors = {prefix + n: t.clone() for n, t in mtp.layer.state_dict().items()}
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    pre = {}
    hook = model.model.norm.register_forward_hook(lambda _m, args, _out: pre.update(h=args[0]))
    with torch.no_grad():
        model(input_ids=ids)
        expected = mtp(ids[:, 1:], pre["h"][:, :-1])

    processor = QuaRotProcessor(QuaRotConfig(type="quarot", seed=4), ProcessorContext(
        "Glm4MoeAdapter", adapter.structure, adapter.attention_shape(), adapter.mla_shape()))
    processor.check_model(model, adapter.block_names(model))
    processor.prepare_model(model)
    for name in adapter.block_names(model):
        processor.after_forward(name, model.get_submodule(name))
    rotated = processor.rotate_mtp(tensors, prefix)
    with torch.no_grad():
        model(input_ids=ids)  # the rotated main model's pre-final-norm hidden state
    hook.remove()
    ours = GlmMtp(config, index).eval()
    ours.layer.load_state_dict({n[len(prefix):]: t for n, t in rotated.items()})
    with torch.no_grad():
        change = float((ours(ids[:, 1:], pre["h"][:, :-1]) - expected).abs().max())
    report(capsys, "glm4_moe MTP layer rotated from its tensors", change, float(expected.abs().max()))
    assert change < BOUND * float(expected.abs().max())
    for name in ("eh_proj.weight", "self_attn.v_proj.weight", "mlp.shared_experts.down_proj.weight",
                 "shared_head.head.weight"):
        assert not torch.allclose(rotated[prefix + name], tensors[prefix + name]), name


# ---- DeepSeek-V4 (model/deepseek_v4.py): native names, hyper-connection streams, compressor and indexer ----------
V4 = "DeepSeek-V4-Flash"
V4_LAYERS = ("layers.0", "layers.1", "layers.2")  # sliding, CSA (compressor + indexer), HCA (compressor)


@pytest.fixture(scope="module")
def v4_source(tmp_path_factory):
    """A tiny DeepSeek-V4 as published (native names), with norm gains away from 1 and outlier channels (every
    scale far from 1, a missing fold visible), decisive routers, a grouped output projection with large rows."""
    source = make_tiny_model(tmp_path_factory.mktemp("deepseek_v4"), "deepseek_v4", seed=3)
    (weights,) = source.glob("*.safetensors")
    state, g = load_file(weights), torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if name.endswith(("attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight")):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            tensor[[3, 17] if "attn" in name else [5]] *= 20
        elif name.endswith("ffn.gate.weight"):
            tensor.normal_(0, 0.3, generator=g)
        elif name.endswith("attn.wo_a.weight"):
            tensor[[2, 9]] *= 10
    save_file(state, weights, metadata={"format": "pt"})
    return source


def v4_change(source, out) -> tuple[float, float]:
    """(max |Δlogit|, max |logit|) of the output read back against transformers' float model of the source."""
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        return float((expected - load_ascendv1(out)(input_ids=ids).logits).abs().max()), float(expected.abs().max())


def v4_step(step: str) -> dict:
    """STEPS[step] with the subgraph kinds DeepSeek-V4 describes (no ov, no up -> down)."""
    config = STEPS[step]
    if "enable_subgraph_type" in config:
        return {**config, "enable_subgraph_type": ["norm-linear", "linear-linear"]}
    return config


@pytest.mark.parametrize("step", list(STEPS))
def test_deepseek_v4_smoothing_alone_leaves_the_float_model_unchanged(v4_source, tmp_path, capsys, step):
    out = tmp_path / "out"
    run_quant(v4_source, out, write_pipeline(tmp_path / "c.yaml", [v4_step(step)], small_calib(tmp_path)), V4)
    change, scale = v4_change(v4_source, out)
    report(capsys, f"deepseek_v4 {step}", change, scale)
    assert change < BOUND * scale
    before, after = saved_tensors(v4_source), saved_tensors(out)
    assert set(before) == set(after), "the output keeps the native names"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "layers.1.attn_norm.weight" in changed, "nothing was smoothed"
    if step == "awq":  # its grid holds α = 0 (s = 1), which a subgraph may pick: only exactness is certain
        return
    for layer in V4_LAYERS:  # one scale for the router, every expert and the shared expert
        assert {f"{layer}.ffn_norm.weight", f"{layer}.ffn.gate.weight", f"{layer}.ffn.experts.3.w1.weight",
                f"{layer}.ffn.shared_experts.w3.weight", f"{layer}.attn.wq_a.weight", f"{layer}.attn.wkv.weight",
                f"{layer}.attn.q_norm.weight", f"{layer}.attn.wq_b.weight"} <= changed
    # the compressors and the indexer read the input norm (float, but their columns take its scale)
    assert {"layers.1.attn.compressor.wkv.weight", "layers.1.attn.indexer.compressor.wgate.weight",
            "layers.1.attn.indexer.weights_proj.weight", "layers.1.attn.indexer.wq_b.weight",
            "layers.2.attn.compressor.wgate.weight"} <= changed
    # no up -> down: up is clamped before the product
    assert not any(k.endswith(".w2.weight") for k in changed)


def test_deepseek_v4_rotation_alone_leaves_the_float_model_unchanged(v4_source, tmp_path, capsys):
    out = tmp_path / "out"
    run_quant(v4_source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), V4)
    change, scale = v4_change(v4_source, out)
    report(capsys, "deepseek_v4 quarot", change, scale)
    assert change < BOUND * scale
    before, after = saved_tensors(v4_source), saved_tensors(out)
    for name in ("embed.weight", "head.weight", "hc_head_fn", "layers.0.hc_attn_fn", "layers.2.hc_ffn_fn",
                 "layers.1.attn.wq_a.weight", "layers.1.attn.indexer.weights_proj.weight",
                 "layers.2.attn.compressor.wkv.weight", "layers.0.attn.wo_b.weight", "layers.1.ffn.gate.weight",
                 "layers.1.ffn.experts.2.w2.weight", "layers.2.ffn.shared_experts.w1.weight"):
        assert not torch.allclose(before[name], after[name]), f"{name} was not rotated"
    for name in ("layers.1.attn.wq_b.weight", "layers.1.attn.wo_a.weight", "hc_head_base"):  # off the residual
        assert torch.equal(before[name], after[name]), name


V4_FORGOTTEN = ["attn.compressor.wgate?", "attn.indexer.weights_proj?", "ffn.gate"]


@pytest.mark.parametrize("reader", V4_FORGOTTEN)
def test_deepseek_v4_a_structure_that_forgets_a_reader_changes_the_logits(v4_source, tmp_path, monkeypatch, capsys,
                                                                         reader):
    from msmodelslim.model.deepseek_v4 import DeepseekV4Adapter

    described = DeepseekV4Adapter.structure.smooth_subgraphs
    assert without(reader, described) != described
    monkeypatch.setattr(DeepseekV4Adapter, "structure",
                        replace(DeepseekV4Adapter.structure, smooth_subgraphs=without(reader, described)))
    out = tmp_path / "out"
    run_quant(v4_source, out, write_pipeline(tmp_path / "c.yaml", [v4_step("smooth_quant")], small_calib(tmp_path)), V4)
    change, scale = v4_change(v4_source, out)
    report(capsys, f"deepseek_v4 smooth_quant WITHOUT {reader} (must break)", change, scale)
    assert change > 100 * BOUND * scale


def test_deepseek_v4_rotation_needs_the_hyper_connection_streams(v4_source, tmp_path, monkeypatch, capsys):
    """hc_attn_fn / hc_ffn_fn read the residual streams: left unrotated, the stream mixing changes."""
    from msmodelslim.model.deepseek_v4 import DeepseekV4Adapter

    rotation = replace(DeepseekV4Adapter.structure.rotation, stream_readers=())
    monkeypatch.setattr(DeepseekV4Adapter, "structure", replace(DeepseekV4Adapter.structure, rotation=rotation))
    out = tmp_path / "out"
    run_quant(v4_source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), V4)
    change, scale = v4_change(v4_source, out)
    report(capsys, "deepseek_v4 quarot WITHOUT the hyper-connection weights (must break)", change, scale)
    assert change > 100 * BOUND * scale


@pytest.mark.parametrize("first", ["iter_smooth", "quarot"])
def test_deepseek_v4_layer_wise_equals_model_wise(v4_source, tmp_path, first):
    layer_wise, model_wise = outputs_of_both_runners(v4_source, tmp_path, [{"type": first}, W8A8_DYNAMIC], V4)
    assert layer_wise and layer_wise == model_wise


def test_deepseek_v4_quarot_flex_smooth_then_static_attention_checks(v4_source, tmp_path):
    static_attention = {"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": ["*.attn.*"]},
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["*.attn.*"]}]}
    out = tmp_path / "out"
    run_quant(v4_source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot"}, {"type": "flex_smooth_quant"},
                                                            static_attention], small_calib(tmp_path)), V4)
    assert main(["check", str(out)]) == 0


# ---- DeepSeek-V4's multi-token-prediction layer: rotated from its tensors, exactly -----------------------------------
def v4_mtp_tensors(config, seed: int = 11) -> dict[str, torch.Tensor]:
    """A random DeepSeek-V4 MTP layer under its checkpoint names (`mtp.0.*`): enorm/e_proj, hnorm/h_proj, a sliding
    decoder block in native names, its own collapse (hc_head_*), norm, head and embedding copy."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    from msmodelslim.model.deepseek_v4 import native_layer

    torch.manual_seed(seed)
    block = DeepseekV4DecoderLayer(config, 0)
    native_layer(block)
    h, vocab, hc = config.hidden_size, config.vocab_size, config.hc_mult
    tensors = {f"mtp.0.{n}": t.detach().clone() for n, t in block.state_dict().items()}
    tensors.update({"mtp.0.e_proj.weight": torch.empty(h, h), "mtp.0.h_proj.weight": torch.empty(h, h),
                    "mtp.0.enorm.weight": torch.empty(h), "mtp.0.hnorm.weight": torch.empty(h),
                    "mtp.0.norm.weight": torch.empty(h), "mtp.0.head.weight": torch.empty(vocab, h),
                    "mtp.0.emb.tok_emb.weight": torch.empty(vocab, h), "mtp.0.hc_head_fn": torch.empty(hc, hc * h),
                    "mtp.0.hc_head_base": torch.empty(hc), "mtp.0.hc_head_scale": torch.ones(1)})
    for name, t in tensors.items():
        if name.endswith("scale"):  # hyper-connection scales: ones, as transformers initialises them (the bare
            t.fill_(1.0)            # layer above leaves them as torch.empty's memory, sometimes NaN)
        elif t.is_floating_point():
            t.copy_(0.5 + torch.rand(t.shape) if t.dim() == 1 else torch.randn(t.shape) * 0.08)
    return tensors


def v4_mtp_logits(tensors: dict[str, torch.Tensor], config, streams, next_ids, block_kwargs) -> torch.Tensor:
    """The MTP layer as the engine runs it (vLLM's DeepSeekV4MultiTokenPredictorLayer): the main model's pre-collapse
    streams and the next tokens in, the draft logits out."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer, DeepseekV4HyperHead

    from msmodelslim.model.deepseek_v4 import native_layer

    t = {n.removeprefix("mtp.0."): v for n, v in tensors.items()}
    block = DeepseekV4DecoderLayer(config, 0)
    native_layer(block)
    block.load_state_dict({n: t[n] for n in block.state_dict()})
    head = DeepseekV4HyperHead(config)
    head.load_state_dict({"hc_fn": t["hc_head_fn"], "hc_base": t["hc_head_base"], "hc_scale": t["hc_head_scale"]})
    eps = config.rms_norm_eps

    def rms(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    with torch.no_grad():
        embedded = rms(nn.functional.embedding(next_ids, t["emb.tok_emb.weight"]), t["enorm.weight"])
        x = rms(streams, t["hnorm.weight"]) @ t["h_proj.weight"].T + (embedded @ t["e_proj.weight"].T).unsqueeze(-2)
        x = block.eval()(x, **block_kwargs)
        return rms(head(x), t["norm.weight"]) @ t["head.weight"].T


def test_deepseek_v4_mtp_layer_rotated_from_its_tensors_predicts_what_it_predicted(v4_source, capsys):
    from msmodelslim.model.passthrough import MTP, PassThroughGroup

    adapter = create_adapter(V4, str(v4_source), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    config = model.config
    tensors = v4_mtp_tensors(config)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    next_ids = torch.roll(ids, -1, dims=1)

    def streams_and_kwargs():
        seen = {}
        hook = model.model.hc_head.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
        _, kwargs = adapter.capture_first_block_inputs(model, {"input_ids": ids})
        return seen["h"], kwargs

    streams, kwargs = streams_and_kwargs()
    expected = v4_mtp_logits(tensors, config, streams, next_ids, kwargs)
    processor = QuaRotProcessor(QuaRotConfig(type="quarot", seed=4), ProcessorContext(
        "DeepseekV4Adapter", adapter.structure, adapter.attention_shape(), adapter.mla_shape()))
    processor.check_model(model, adapter.block_names(model))
    processor.prepare_model(model)
    for name in adapter.block_names(model):
        processor.after_forward(name, model.get_submodule(name))
    group = PassThroughGroup("mtp", MTP, tuple(tensors))
    assert processor.changes_passthrough(group)
    rotated = processor.transform_passthrough(group, {n: t.clone() for n, t in tensors.items()})
    assert set(rotated) == set(tensors)
    streams, kwargs = streams_and_kwargs()  # the rotated main model's streams
    change = float((v4_mtp_logits(rotated, config, streams, next_ids, kwargs) - expected).abs().max())
    report(capsys, "deepseek_v4 MTP layer rotated from its tensors", change, float(expected.abs().max()))
    assert change < BOUND * float(expected.abs().max())
    for name in ("e_proj.weight", "h_proj.weight", "head.weight", "hc_head_fn", "emb.tok_emb.weight",
                 "attn.wq_a.weight", "ffn.experts.1.w2.weight", "hc_ffn_fn"):
        assert not torch.allclose(rotated[f"mtp.0.{name}"], tensors[f"mtp.0.{name}"]), name


def test_deepseek_v4_quarot_with_an_mtp_layer_end_to_end(v4_source, tmp_path):
    import shutil

    source = tmp_path / "with_mtp"
    shutil.copytree(v4_source, source)
    (weights,) = source.glob("*.safetensors")
    config = AutoModelForCausalLM.from_pretrained(v4_source).config
    mtp = v4_mtp_tensors(config)
    save_file({**load_file(weights), **mtp}, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot"}, W8A8_DYNAMIC]), V4)
    assert main(["check", str(out), "--model_path", str(source)]) == 0
    after = saved_tensors(out)
    assert not torch.allclose(after["mtp.0.h_proj.weight"], mtp["mtp.0.h_proj.weight"])  # rotated, written float
    assert torch.equal(after["mtp.0.hc_head_base"], mtp["mtp.0.hc_head_base"])
