"""Smoothing on LongCat-Flash (model/longcat.py): two MLA attentions and two dense MLPs per layer, plus a shortcut
MoE that reads the first post-attention norm and may hold zero-computation (identity) experts.

Every smoothing processor leaves the float model's logits unchanged (max |Δlogit| printed), with identity experts
(the first post-attention norm is then left alone) and without them (the norm's scale then also reaches the
router's columns and every expert); smoothing that norm while identity experts read it, or forgetting the router,
is caught by the same measurement; layer_wise, model_wise and two dp_layer_wise ranks write the same bytes."""
from dataclasses import replace

import pytest
import torch

from helpers import SCHEMES, quantize_variants, run_quant, saved_tensors, shard_bytes, small_calib, write_pipeline
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model import longcat
from msmodelslim.model.longcat import SHORTCUT_NORM, longcat_smoothing
from test_families_text import float_reference
from test_family_transforms import BOUND, STEPS, W8A8_DYNAMIC, plant_published, report
from test_moe_smoothing import rank_threads, varied_calib  # noqa: F401  (a fixture)
from tiny_models import make_tiny_model

MODEL_TYPE = "LongCat-Flash-Chat"
LAYER = "model.layers.1"
VARIANTS = {"identity_experts": {}, "routed_only": {"zero_expert_num": 0}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {variant: plant_published(make_tiny_model(tmp_path_factory.mktemp(variant), "longcat_flash", seed=3, **sizes),
                                     router="router.classifier.weight")
            for variant, sizes in VARIANTS.items()}


def max_logit_change(source, out) -> tuple[float, float]:
    original = float_reference(source, "longcat_flash")
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        return float((expected - load_ascendv1(out)(input_ids=ids).logits).abs().max()), float(expected.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("step", list(STEPS))
def test_smoothing_alone_leaves_the_float_model_unchanged(sources, tmp_path, capsys, variant, step):
    source, out = sources[variant], tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [STEPS[step]], small_calib(tmp_path)), MODEL_TYPE)
    change, scale = max_logit_change(source, out)
    report(capsys, f"longcat_flash ({variant}) {step}", change, scale)
    assert change < BOUND * scale
    before, after = saved_tensors(source), saved_tensors(out)
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert {f"{LAYER}.input_layernorm.0.weight", f"{LAYER}.input_layernorm.1.weight"} <= changed, "nothing smoothed"
    shortcut = f"{LAYER}.{SHORTCUT_NORM}.weight"
    if variant == "identity_experts":  # the identity experts return that norm's output: it must keep scale 1
        assert shortcut not in changed
    if step == "awq":  # its grid holds α = 0 (s = 1), which a subgraph may pick: only exactness is certain
        return
    assert {f"{LAYER}.self_attn.0.o_proj.weight", f"{LAYER}.self_attn.1.o_proj.weight",
            f"{LAYER}.self_attn.1.q_b_proj.weight", f"{LAYER}.self_attn.0.kv_b_proj.weight",
            f"{LAYER}.post_attention_layernorm.1.weight", f"{LAYER}.mlps.0.down_proj.weight",
            f"{LAYER}.mlps.1.down_proj.weight"} <= changed
    assert all(f"{LAYER}.mlp.experts.{e}.down_proj.weight" in changed for e in range(4))
    if variant == "routed_only":  # the router's columns took the norm's scale: routing unchanged
        assert {shortcut, f"{LAYER}.mlp.router.classifier.weight"} <= changed


def structure_patch(monkeypatch, subgraphs) -> None:
    monkeypatch.setattr(longcat, "longcat_smoothing", lambda identity_experts: subgraphs)


@pytest.mark.parametrize("variant, subgraphs, why", [
    ("identity_experts", longcat_smoothing(identity_experts=False), "the shortcut norm smoothed under identity experts"),
    ("routed_only", tuple(replace(g, targets=tuple(t for t in g.targets if t != "mlp.router.classifier"))
                          for g in longcat_smoothing(identity_experts=False)), "the router forgotten"),
])
def test_a_wrong_structure_changes_the_logits(sources, tmp_path, monkeypatch, capsys, variant, subgraphs, why):
    structure_patch(monkeypatch, subgraphs)
    source, out = sources[variant], tmp_path / "out"
    run_quant(source, out,
              write_pipeline(tmp_path / "c.yaml", [STEPS["smooth_quant"]], small_calib(tmp_path)), MODEL_TYPE)
    change, scale = max_logit_change(source, out)
    report(capsys, f"longcat_flash smooth_quant with {why} (must break)", change, scale)
    assert change > 100 * BOUND * scale


def test_every_runner_writes_the_same_bytes_and_the_output_checks(sources, tmp_path, rank_threads):
    """iter_smooth then static W8A8 attention and dynamic W8A8 elsewhere (the merges are exact: equal bytes)."""
    attention = "*self_attn*"
    process = [{"type": "iter_smooth"}, {"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": [attention]},
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head", attention]}]}]
    outs = quantize_variants(sources["identity_experts"], tmp_path, process, MODEL_TYPE, {
        "layer_wise": ("layer_wise", DeviceSpec("cpu")), "model_wise": ("model_wise", DeviceSpec("cpu")),
        "dp": ("dp_layer_wise", DeviceSpec("cpu", (0, 1)))}, varied_calib(tmp_path))
    layer_wise, model_wise, dp = (shard_bytes(outs[k]) for k in ("layer_wise", "model_wise", "dp"))
    assert layer_wise and layer_wise == model_wise
    assert dp == layer_wise, "two ranks must write the single-process checkpoint"
    assert main(["check", str(outs["layer_wise"])]) == 0


def test_quarot_is_refused_by_name_before_any_weight_is_read(sources, tmp_path):
    config = write_pipeline(tmp_path / "c.yaml", [{"type": "quarot"}, W8A8_DYNAMIC])
    with pytest.raises(UnsupportedError, match="quarot: adapter LongcatFlashAdapter does not describe where to rotate"):
        run_quant(sources["identity_experts"], tmp_path / "out", config, MODEL_TYPE)
    assert not (tmp_path / "out").exists()
