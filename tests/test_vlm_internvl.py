"""InternVL3.5 (model/vlm_internvl.py) on tiny random checkpoints in the -HF layout (tests/tiny_vlm.py): InternViT +
MLP projector + Qwen3 (InternVL3_5-38B) or Qwen3-MoE (InternVL3_5-241B-A28B) text. The block-by-block walk (tower,
projector, text layers) equals transformers' model on image+prompt inputs; module names are the published ones;
iter_smooth and quarot are exact in float on images (quarot must rotate the projector's output rows); the upstream
recipe (quarot -> iter_smooth -> W8A8 static, vision MLPs excluded) goes quant -> check -> both readers, with the
same bytes from layer_wise and model_wise and the untouched vision tensors byte for byte; compressed-tensors output
loads in transformers and equals our reader; the custom-code layout is refused before any weight is read."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model import registry
from msmodelslim.model.vlm_internvl import InternVl35Adapter
from test_vlm_models import (CPU, FLOAT_BOUND, PROCESSOR_FILES, W8A8_DYNAMIC, W8A8_STATIC, assert_our_readers_agree,
                             finish_walk, logits, stored, transformed, walked_logits, write_ascendv1)
from tiny_vlm import PROMPT, image_samples, make_tiny_vlm

FAMILIES = {"internvl": "InternVL3_5-38B", "internvl_moe": "InternVL3_5-241B-A28B"}
# upstream's InternVL recipe (lab_practice/internvl3_5): the vision MLPs and the text down_proj stay float; here
# also the projector (the `*multi_modal_projector*` exclude works like Qwen's `*merger*`)
EXCLUDES = ["*vision_tower.encoder.layer.*.mlp.fc1", "*vision_tower.encoder.layer.*.mlp.fc2", "*lm_head",
            "*multi_modal_projector*"]
RECIPE = [{"type": "quarot"}, {"type": "iter_smooth"},
          {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*"], "exclude": EXCLUDES + ["*experts*",
                                                                                                  "*mlp.gate"]},
          {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*experts*"]}]
READ_BACK_BOUND = 0.15  # relative logit error (‖Δ‖/‖logits‖) of the W8A8 model read back, image+prompt inputs


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    return {family: make_tiny_vlm(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def adapter_of(family: str, path: Path) -> InternVl35Adapter:
    return InternVl35Adapter(FAMILIES[family], path)


_ORIGINALS: dict[str, torch.nn.Module] = {}


def original_model(family: str, path: Path) -> torch.nn.Module:
    if family not in _ORIGINALS:
        _ORIGINALS[family] = adapter_of(family, path).init_model(CPU, load_layers=True)
    return _ORIGINALS[family]


# ---- structure and forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_walk_equals_transformers_on_image_and_text(vlms, images, family):
    from transformers import AutoModelForImageTextToText

    adapter = adapter_of(family, vlms[family])
    model = original_model(family, vlms[family])
    reference = AutoModelForImageTextToText.from_pretrained(vlms[family], dtype=torch.float32).eval()
    batches = adapter.handle_dataset(image_samples(images[:2]) + ["a prompt without an image"], CPU)
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[2]
    image_token = reference.config.image_token_id
    assert int((batches[0]["input_ids"] == image_token).sum()) == batches[0]["pixel_values"].shape[0] * 4
    for batch in batches:
        want = logits(reference, batch)
        assert (logits(model, batch) - want).abs().max() < 1e-5  # the published names loaded into the same model
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"{family}: walk vs transformers max |Δlogit| {delta:.2e}")
        assert delta < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_module_names_are_the_published_checkpoint_names(vlms, family):
    adapter = adapter_of(family, vlms[family])
    assert adapter.family.moe == (family == "internvl_moe")  # the text decoder read from config.json
    skeleton = adapter.init_skeleton()
    assert adapter.unused_checkpoint_tensors(skeleton) == []  # every published tensor is read by its own name
    assert set(skeleton.state_dict()) - set(adapter.checkpoint.names()) <= {
        n for n in skeleton.state_dict() if ".experts." in n}  # (per-expert names, cut from stacked tensors)
    blocks = adapter.block_names(skeleton)
    assert blocks == ["vision_tower", "multi_modal_projector"] + [f"language_model.model.layers.{i}" for i in range(3)]
    assert adapter.loader_module_name("language_model.model.layers.0.mlp.up_proj") == \
        "model.language_model.layers.0.mlp.up_proj"
    assert adapter.loader_module_name("vision_tower.encoder.layer.0.mlp.fc1") == \
        "model.vision_tower.encoder.layer.0.mlp.fc1"


def test_both_names_are_registered_under_upstream_keys_and_rebuild_by_model_type(vlms):
    table = registry.registered_adapters()
    for key, name in (("internvl3_5_dense", "InternVL3_5-38B"), ("internvl3_5_moe", "InternVL3_5-241B-A28B")):
        assert table[name].key == key and table[name].pedigree == "internvl3_5"
        assert registry.adapter_class(name) is InternVl35Adapter and InternVl35Adapter.is_vlm
    from msmodelslim.model.rebuild import family_skeleton

    skeleton = family_skeleton(vlms["internvl_moe"], False).model  # the reader's rebuild: the MoE text decoder
    assert "language_model.model.layers.0.mlp.experts.3.down_proj.weight" in skeleton.state_dict()


# ---- float-exact transforms -----------------------------------------------------------------------------------
TRANSFORMS = {"iter_smooth": [{"type": "iter_smooth"}],
              "quarot+iter_smooth": [{"type": "quarot"}, {"type": "iter_smooth"}]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_are_exact_in_float_on_images(vlms, images, family, transform):
    data = image_samples(images[:2]) + ["a prompt without an image"]
    original = original_model(family, vlms[family])
    model, batches = transformed(adapter_of(family, vlms[family]), TRANSFORMS[transform], data)
    delta = max((logits(model, b) - logits(original, b)).abs().max().item() for b in batches)
    print(f"{family} {transform}: max |Δlogit| {delta:.2e} on image+prompt")
    assert delta < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layers.0.self_attn.q_proj." in k for k in changed)  # the transform did act on the text layers
    vision = {k for k in changed if k.startswith(("vision_tower.", "multi_modal_projector."))}
    # only the rotation touches the vision part, and only the rows of the projector's output linear
    assert vision == ({"multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}
                      if transform.startswith("quarot") else set())


def test_quarot_must_rotate_the_projector_output(vlms, images):
    """The image rows are scattered into the rotated residual stream: leaving the projector's linear_2 unrotated
    breaks the model on images (and only there)."""
    original = original_model("internvl", vlms["internvl"])
    broken = adapter_of("internvl", vlms["internvl"])
    broken.structure = replace(broken.structure, rotation=replace(broken.structure.rotation, outside_writers=()))
    model, (image_batch, text_batch) = transformed(broken, [{"type": "quarot"}],
                                                   image_samples(images[:1]) + ["a prompt without an image"])
    assert (logits(model, text_batch) - logits(original, text_batch)).abs().max() < FLOAT_BOUND
    assert (logits(model, image_batch) - logits(original, image_batch)).abs().max() > 1e-2


# ---- the vision blocks ----------------------------------------------------------------------------------------
def test_the_text_layers_see_the_quantized_vision_blocks_output(vlms, images):
    """The runner hands back each vision block's float output; the walk feeds the projector and the text layers
    what the quantized blocks give (the served model): the walk equals the quantized model's own forward."""
    adapter = adapter_of("internvl", vlms["internvl"])
    process = [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["vision_tower*", "multi_modal*"]}]
    model, (batch,) = transformed(adapter, process, image_samples(images[:1]))
    float_model = original_model("internvl", vlms["internvl"])
    walk = adapter.generate_model_forward(model, batch)
    request = next(walk)
    assert request.name == "vision_tower"
    with torch.no_grad():  # the float blocks' outputs stand for what the runner hands back
        request = walk.send(float_model.get_submodule(request.name)(*request.args, **request.kwargs))
        assert request.name == "multi_modal_projector"
        request = walk.send(float_model.get_submodule(request.name)(*request.args, **request.kwargs))
    assert request.name == "language_model.model.layers.0"
    served, _ = adapter.capture_first_block_inputs(model, batch)
    unquantized, _ = adapter.capture_first_block_inputs(float_model, batch)
    assert torch.equal(request.args[0], served[0]) and not torch.equal(served[0], unquantized[0])


@pytest.mark.parametrize("finished", [0, 1])
def test_a_resumed_walk_continues_exactly(vlms, images, finished):
    adapter = adapter_of("internvl", vlms["internvl"])
    model = original_model("internvl", vlms["internvl"])
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    want = walked_logits(adapter, model, batch)
    walk = adapter.generate_model_forward(model, batch)
    request = next(walk)
    with torch.no_grad():  # the uninterrupted walk up to text layer `finished`: its input is what was saved
        for _ in range(finished + 2):
            request = walk.send(request.module(*request.args, **request.kwargs))
    saved = request.args[0].clone()
    resumed = adapter.generate_model_forward(model, batch)
    next(resumed)
    for _ in range(finished + 2):  # the two vision blocks and the finished text layers
        request = resumed.send(saved)
    assert request.name == f"language_model.model.layers.{finished}" and request.args[0] is saved
    assert (finish_walk(adapter, model, resumed, request) - want).abs().max() < 1e-5


# ---- output ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_upstream_recipe_quant_check_and_both_readers(tmp_path, vlms, images, family):
    """quarot -> iter_smooth -> W8A8 static (W8A8 dynamic experts), vision MLPs, projector and lm_head float:
    layer_wise and model_wise write the same bytes; the checklist passes; the float vision tensors are written
    byte for byte; our reader and the reference reader agree, close to float on image+prompt inputs."""
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    source = vlms[family]
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(family, source), RECIPE, image_samples(images), outs[runner],
                              layer_wise=runner == "layer_wise")
    assert stored(outs["layer_wise"]) == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["vision_tower.encoder.layer.0.attention.q_proj.weight"] == "W8A8"  # the tower is a block
    assert description["vision_tower.encoder.layer.0.mlp.fc1.weight"] == "FLOAT"  # upstream's excludes
    assert description["multi_modal_projector.linear_1.weight"] == "FLOAT"
    assert description["language_model.model.layers.0.self_attn.q_proj.weight"] == "W8A8"
    if family == "internvl_moe":
        assert description["language_model.model.layers.0.mlp.experts.0.gate_proj.weight"] == "W8A8_DYNAMIC"
        assert description["language_model.model.layers.0.mlp.gate.weight"] == "FLOAT"
    source_tensors, written = stored(source), stored(out)
    quantized = {n.removesuffix(".weight") for n, t in description.items() if n.endswith(".weight") and t != "FLOAT"}
    rotated = {"multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}
    untouched = [n for n in source_tensors if n.startswith(("vision_tower.", "multi_modal_projector."))
                 and n.rsplit(".", 1)[0] not in quantized and n not in rotated]
    assert len(untouched) > 20 and all(written[n] == source_tensors[n] for n in untouched)  # byte for byte
    assert all(written[n] != source_tensors[n] for n in rotated)  # quarot rotated the projector's output rows
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    float_model = original_model(family, source)
    for batch in adapter_of(family, source).handle_dataset(image_samples(images[:2]), CPU):
        want, got, theirs = logits(float_model, batch), logits(ours, batch), logits(reference, batch)
        relative = ((got - want).norm() / want.norm()).item()
        agreement = ((got - theirs).abs().max() / theirs.abs().max()).item()
        print(f"{family} upstream recipe read back: relative logit error {relative:.3f}, our reader vs the "
              f"reference reader {agreement:.1e}")
        assert relative < READ_BACK_BOUND and agreement < 2e-3


# ---- refusals -------------------------------------------------------------------------------------------------
def test_the_custom_code_layout_is_refused_before_any_weight_is_read(vlms, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    state = load_file(vlms["internvl"] / "model.safetensors")
    custom = {"vision_tower.": "vision_model.", "multi_modal_projector.": "mlp1."}
    for layout in ("config", "names"):
        path = tmp_path / layout
        path.mkdir()
        for file in vlms["internvl"].iterdir():
            if file.suffix != ".safetensors":
                (path / file.name).write_bytes(file.read_bytes())
        renamed = {next((k.replace(a, b, 1) for a, b in custom.items() if k.startswith(a)), k): v
                   for k, v in state.items()}
        save_file(renamed, path / "model.safetensors")
        if layout == "config":  # OpenGVLab's config.json: model_type internvl_chat, InternVLChatModel (custom code)
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "model_type": "internvl_chat",
                                                          "architectures": ["InternVLChatModel"]}))
        monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                            lambda *a, **k: pytest.fail("a weight was read"))
        with pytest.raises(UnsupportedError, match="custom-code layout.*-HF"):
            adapter_of("internvl", path)
        monkeypatch.undo()


def test_cli_quant_and_check(tmp_path, vlms, images):
    """`msmodelslim quant --model_type InternVL3_5-38B` from a multimodal_vlm_modelslim_v1 YAML, then `check`."""
    import yaml

    from msmodelslim.cli.__main__ import main

    config = tmp_path / "internvl_w8a8.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": RECIPE[:3], "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        "dataset": str(images[0].parent), "default_text": PROMPT}}))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(vlms["internvl"]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "InternVL3_5-38B", "--config_path", str(config)]) == 0
    assert main(["check", str(out)]) == 0


def test_compressed_tensors_loads_in_transformers_and_equals_our_reader(tmp_path, vlms, images):
    """The same W8A8 dynamic run written both ways: transformers' InternVL class (with the compressed-tensors
    library) reads the -HF names and computes what our ascendv1 reader computes; quantization_config names
    transformers' modules (the -HF names are renamed on load)."""
    from transformers import AutoModelForImageTextToText

    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.ir.quant_linear import QuantLinear

    source = vlms["internvl"]
    process = [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"],
                "exclude": ["*lm_head", "*multi_modal_projector*"]}]
    write_ascendv1(adapter_of("internvl", source), process, [], tmp_path / "ct", True, compressed_tensors=True)
    write_ascendv1(adapter_of("internvl", source), process, [], tmp_path / "ascendv1", True)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = [t for group in config["config_groups"].values() for t in group["targets"]]
    assert "model.language_model.layers.0.self_attn.q_proj" in targets
    assert "model.vision_tower.encoder.layer.0.mlp.fc1" in targets
    assert "model.multi_modal_projector.linear_1" in config["ignore"]
    assert_our_readers_agree(tmp_path / "ct", tmp_path / "ascendv1",
                             adapter_of("internvl", source).handle_dataset(image_samples(images[:2]), CPU))
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                         local_files_only=True).eval()
    ours = load_ascendv1(tmp_path / "ascendv1")

    def ct_dynamic(x: torch.Tensor) -> torch.Tensor:  # compressed-tensors' emulation (see test_vlm_models)
        scale = (x.abs().amax(-1, keepdim=True) if x.dim() > 2 else x.abs().amax()) / 127.5
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    for module in ours.modules():
        if isinstance(module, QuantLinear):
            module.quantize_input = ct_dynamic
    for batch in adapter_of("internvl", source).handle_dataset(image_samples(images[:2]), CPU):
        want, got = logits(ours, batch), logits(theirs, batch)
        drift = ((got - logits(original_model("internvl", source), batch)).norm() / want.norm()).item()
        relative = ((got - want).norm() / want.norm()).item()
        print(f"internvl compressed-tensors in transformers vs our reader: relative {relative:.1e} (vs float "
              f"{drift:.3f})")
        assert relative < 1e-3 and drift > 1e-3
