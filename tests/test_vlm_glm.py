"""GLM-4.6V (model/vlm_glm.py) on a tiny random glm4v_moe checkpoint (tests/tiny_vlm.py): GLM vision tower + MoE
text decoder (a dense first layer, then a sigmoid router, a shared expert and routed experts) with M-RoPE over
partial rotary dims. The block-by-block walk equals transformers' model on image+prompt inputs; module names are the
published ones; iter_smooth and quarot are exact in float on images (quarot rotates only the merger's down_proj in the
tower); upstream's recipe (iter_smooth -> W8A8 static attention, W8A8 dynamic MLPs and experts, vision tower and
routers float) goes quant -> check -> both readers, with the same bytes from layer_wise and model_wise and the vision
tensors byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msmodelslim.model import registry
from msmodelslim.model.vlm_glm import Glm46VAdapter
from test_vlm_models import (CPU, FLOAT_BOUND, PROCESSOR_FILES, W8A8_DYNAMIC, W8A8_STATIC, logits, stored,
                             transformed, walked_logits, write_ascendv1)
from tiny_vlm import image_samples, make_tiny_vlm

RECIPE = [{"type": "iter_smooth"},  # lab_practice/glm4_6v/glm4_6v-w8a8.yaml
          {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*self_attn*"], "exclude": ["*visual*"]},
          {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*mlp*"],
           "exclude": ["*visual*", "*mlp.gate"]}]
READ_BACK_BOUND = 0.15  # relative logit error (‖Δ‖/‖logits‖) of the W8A8 model read back, image+prompt inputs


@pytest.fixture(scope="module")
def glm(tmp_path_factory) -> Path:
    return make_tiny_vlm(tmp_path_factory.mktemp("glm4v_moe"), "glm4v_moe")


_ORIGINAL: dict[Path, torch.nn.Module] = {}


def original_model(path: Path) -> torch.nn.Module:
    if path not in _ORIGINAL:
        _ORIGINAL[path] = Glm46VAdapter("GLM-4.6V", path).init_model(CPU, load_layers=True)
    return _ORIGINAL[path]


def test_the_walk_equals_transformers_on_image_and_text(glm, images):
    from transformers import AutoModelForImageTextToText

    adapter = Glm46VAdapter("GLM-4.6V", glm)
    model = original_model(glm)
    reference = AutoModelForImageTextToText.from_pretrained(glm, dtype=torch.float32).eval()
    batches = adapter.handle_dataset(image_samples(images[:2]) + ["a prompt without an image"], CPU)
    assert "mm_token_type_ids" in batches[0] and int(batches[0]["image_grid_thw"].prod()) > 0
    for batch in batches:
        want = logits(reference, batch)
        assert (logits(model, batch) - want).abs().max() < 1e-5
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"glm4v_moe: walk vs transformers max |Δlogit| {delta:.2e}")
        assert delta < 1e-5


def test_module_names_are_the_published_names_and_the_name_is_registered(glm):
    adapter = Glm46VAdapter("GLM-4.6V", glm)
    skeleton = adapter.init_skeleton()
    assert adapter.unused_checkpoint_tensors(skeleton) == []
    assert set(skeleton.state_dict()) == set(adapter.checkpoint.names())  # per-expert, as published
    assert adapter.block_names(skeleton) == ["model.visual"] + [f"model.language_model.layers.{i}" for i in range(3)]
    entry = registry.registered_adapters()["GLM-4.6V"]
    assert entry.key == "glm4_6v" and registry.adapter_class("GLM-4.6V") is Glm46VAdapter and Glm46VAdapter.is_vlm
    assert registry.infer_model_type(glm) == "GLM-4.6V"


@pytest.mark.parametrize("transform", ["iter_smooth", "quarot+iter_smooth"])
def test_transforms_are_exact_in_float_on_images(glm, images, transform):
    process = [{"type": "quarot"}] * transform.startswith("quarot") + [{"type": "iter_smooth"}]
    original = original_model(glm)
    model, batches = transformed(Glm46VAdapter("GLM-4.6V", glm), process,
                                 image_samples(images[:2]) + ["a prompt without an image"])
    delta = max((logits(model, b) - logits(original, b)).abs().max().item() for b in batches)
    print(f"glm4v_moe {transform}: max |Δlogit| {delta:.2e} on image+prompt")
    assert delta < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layers.1.mlp.shared_experts.gate_proj." in k for k in changed)  # the MoE layers too
    vision = {k for k in changed if k.startswith("model.visual.")}
    assert vision == ({"model.visual.merger.down_proj.weight"} if transform.startswith("quarot") else set())


def test_upstream_recipe_quant_check_and_both_readers(tmp_path, glm, images):
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(Glm46VAdapter("GLM-4.6V", glm), RECIPE, image_samples(images), outs[runner],
                              layer_wise=runner == "layer_wise")
    assert stored(outs["layer_wise"]) == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    description = json.loads((out / "quant_model_description.json").read_text())
    layer = "model.language_model.layers"
    assert description[f"{layer}.0.self_attn.q_proj.weight"] == "W8A8"
    assert description[f"{layer}.0.mlp.gate_proj.weight"] == "W8A8_DYNAMIC"  # the dense first layer
    assert description[f"{layer}.1.mlp.experts.3.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description[f"{layer}.1.mlp.shared_experts.up_proj.weight"] == "W8A8_DYNAMIC"
    assert description[f"{layer}.1.mlp.gate.weight"] == "FLOAT"
    source_tensors, written = stored(glm), stored(out)
    vision = [n for n in source_tensors if n.startswith("model.visual.")]
    assert vision and all(written[n] == source_tensors[n] and description[n] == "FLOAT" for n in vision)
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (glm / name).read_bytes()
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    for batch in Glm46VAdapter("GLM-4.6V", glm).handle_dataset(image_samples(images[:2]), CPU):
        want, got, theirs = logits(original_model(glm), batch), logits(ours, batch), logits(reference, batch)
        relative = ((got - want).norm() / want.norm()).item()
        agreement = ((got - theirs).abs().max() / theirs.abs().max()).item()
        print(f"glm4v_moe upstream recipe read back: relative logit error {relative:.3f}, our reader vs the "
              f"reference reader {agreement:.1e}")
        assert relative < READ_BACK_BOUND and agreement < 2e-3


def test_quarot_written_and_read_back_is_exact_on_an_image(tmp_path, glm, images):
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    write_ascendv1(Glm46VAdapter("GLM-4.6V", glm), [{"type": "quarot"}], [], tmp_path / "out", layer_wise=True)
    (batch,) = Glm46VAdapter("GLM-4.6V", glm).handle_dataset(image_samples(images[:1]), CPU)
    delta = (logits(load_ascendv1(tmp_path / "out"), batch) - logits(original_model(glm), batch)).abs().max().item()
    print(f"glm4v_moe quarot written and read back: max |Δlogit| {delta:.2e}")
    assert delta < FLOAT_BOUND


def _variant(glm: Path, path: Path, **config_changes) -> Path:
    """A copy of the tiny checkpoint with config.json changed."""
    path.mkdir()
    for file in glm.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    config = json.loads((glm / "config.json").read_text())
    for key, value in config_changes.items():
        target = config["text_config"] if key == "text_model_type" else config
        target["model_type" if key == "text_model_type" else key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_glm46v_config_of_the_moe_model_runs_alike(glm, images, tmp_path):
    """transformers also builds these modules from model_type glm46v with a glm4v_moe_text text_config (as
    Glm46VForConditionalGeneration): the same weights give the glm4v_moe model's logits. (transformers' own
    from_pretrained of it leaves per-expert tensors unread: glm46v has no rule stacking them.)"""
    from transformers import AutoModelForImageTextToText

    path = _variant(glm, tmp_path / "glm46v", model_type="glm46v", architectures=["Glm46VForConditionalGeneration"])
    adapter = Glm46VAdapter("GLM-4.6V", path)
    model = adapter.init_model(CPU, load_layers=True)
    assert type(model).__name__ == "Glm46VForConditionalGeneration"
    reference = AutoModelForImageTextToText.from_pretrained(glm, dtype=torch.float32).eval()  # glm4v_moe
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    assert (walked_logits(adapter, model, batch) - logits(reference, batch)).abs().max() < 1e-5


def test_a_dense_glm4v_text_decoder_is_refused_before_any_weight_is_read(glm, tmp_path, monkeypatch):
    from msmodelslim.core.errors import UnsupportedError

    path = _variant(glm, tmp_path / "dense", model_type="glm46v", text_model_type="glm4v_text")
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match="dense GLM-4V text decoder.*not supported"):
        Glm46VAdapter("GLM-4.6V", path)
