"""Vision-language adapters (model/vlm.py) on tiny random Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE checkpoints saved
under the published tensor names: the block-by-block forward (the vision tower first, then the text layers) equals
transformers' model on image+prompt inputs (DeepStack included), the module names are the checkpoint's, iter_smooth
and quarot are exact in float (max |Δlogit| printed; quarot must rotate the vision merger's output, shown by leaving
it out) and leave the rest of the tower alone. The vision tower is a block: a rule over its linears quantizes them
(W8A8 dynamic, W8A16 data-free: in the plan and the description, read back by our reader and by transformers'
compressed-tensors), the text layers are calibrated on the quantized tower's output, untouched tensors are written
byte for byte (the same bytes from layer_wise and model_wise), a resumed walk goes on exactly (refused inside
DeepStack layers), a dry run times a text layer; the processor files are copied; `msmodelslim quant` from
multimodal_vlm_modelslim_v1 YAMLs (upstream's qwen3_vl_moe recipe too) -> check."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import InvalidDatasetError, UnsupportedError
from msmodelslim.core.runner import run_blocks
from msmodelslim.core.vlm_dataset import VlmCalibSample
from msmodelslim.model import registry
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.model.vlm import Qwen3VlAdapter, Qwen3VlMoeAdapter, Qwen25VlAdapter
from msmodelslim.processor.base import ProcessorContext, build_pipeline
from tiny_vlm import PROMPT, image_samples, make_tiny_vlm

CPU = torch.device("cpu")
FAMILIES = {"qwen2_5_vl": ("Qwen2.5-VL-7B-Instruct", Qwen25VlAdapter),
            "qwen3_vl": ("Qwen3-VL-4B-Instruct", Qwen3VlAdapter),
            "qwen3_vl_moe": ("Qwen3-VL-30B-A3B", Qwen3VlMoeAdapter)}
FLOAT_BOUND = 1e-4  # max |Δlogit| of a float-exact transform (logits of magnitude ~3)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    return {family: make_tiny_vlm(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def adapter_of(family: str, path: Path):
    name, cls = FAMILIES[family]
    return cls(name, path)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def assert_our_readers_agree(compressed_tensors: Path, ascendv1: Path, batches) -> None:
    """One run's two formats, read back by our two readers, build the same layers: equal logits. The compressed-
    tensors targets name transformers' loaded modules; the reader (and `msmodelslim check`) map them to the tensors'
    own names."""
    from msmodelslim.app.check import check_checkpoint
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.format.compressed_tensors.reader import load_compressed_tensors

    _, findings = check_checkpoint(compressed_tensors)
    assert not [f.message for f in findings if f.level == "error"]
    from_ascendv1, from_compressed = load_ascendv1(ascendv1), load_compressed_tensors(compressed_tensors)
    for batch in batches:
        assert torch.equal(logits(from_compressed, batch), logits(from_ascendv1, batch))


def walked_logits(adapter, model, batch) -> torch.Tensor:
    """The adapter's block-by-block forward (what calibration sees), then the final norm and the head."""
    forward = adapter.generate_model_forward(model, batch)
    return finish_walk(adapter, model, forward, next(forward))


def finish_walk(adapter, model, forward, request) -> torch.Tensor:
    """Run the walk's blocks from `request` to the end; the logits."""
    with torch.no_grad():
        while True:
            output = request.module(*request.args, **request.kwargs)
            try:
                request = forward.send(output)
            except StopIteration:
                break
        rotation = adapter.structure.rotation
        hidden = model.get_submodule(rotation.final_norm)(block_hidden_state(output))
        return model.get_submodule(rotation.lm_head)(hidden).float()


def transformed(adapter, process: list[dict], data) -> tuple[torch.nn.Module, list[dict]]:
    """The model after `process` ran on every block (model_wise, nothing written), and the calibration inputs."""
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape())
    processors = build_pipeline(config.spec.process, context)
    skeleton = adapter.init_skeleton()
    for processor in processors:
        processor.check_model(skeleton, adapter.block_names(skeleton))
    model = adapter.load_weights(skeleton, CPU, load_layers=True)
    batches = adapter.handle_dataset(data, CPU)
    run_blocks(adapter, model, processors, None, batches, CPU, layer_wise=False)
    return model, batches


# ---- structure and forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_walk_equals_transformers_on_image_and_text(vlms, images, family):
    from transformers import AutoModelForImageTextToText

    adapter = adapter_of(family, vlms[family])
    model = adapter.init_model(CPU, load_layers=True)
    reference = AutoModelForImageTextToText.from_pretrained(vlms[family], dtype=torch.float32).eval()
    batches = adapter.handle_dataset(image_samples(images[:2]) + ["a prompt without an image"], CPU)
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[2]
    for batch in batches:
        want = logits(reference, batch)
        assert (logits(model, batch) - want).abs().max() < 1e-5  # the published names loaded into the same model
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"{family}: walk vs transformers max |Δlogit| {delta:.2e}")
        assert delta < 1e-5


def test_deepstack_features_are_added_after_their_layers(vlms, images):
    """Qwen3-VL adds vision-block features to the image positions after text layers 0 and 1: the walk captures and
    applies them (without them the logits move)."""
    adapter = adapter_of("qwen3_vl", vlms["qwen3_vl"])
    model = adapter.init_model(CPU, load_layers=True)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    _, _, text_kwargs = adapter._capture(model, batch)
    assert len(text_kwargs["deepstack_visual_embeds"]) == 2 and text_kwargs["visual_pos_masks"].sum() > 0
    with_deepstack = walked_logits(adapter, model, batch)
    adapter._capture = lambda m, b, *rest, capture=adapter._capture: capture(m, b, *rest)[:2] + ({},)
    assert (walked_logits(adapter, model, batch) - with_deepstack).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_module_names_are_the_published_checkpoint_names(vlms, family):
    adapter = adapter_of(family, vlms[family])
    skeleton = adapter.init_skeleton()
    assert adapter.unused_checkpoint_tensors(skeleton) == []  # every published tensor is read by its own name
    blocks = adapter.block_names(skeleton)
    published = {"qwen2_5_vl": ("model.layers.", "visual."),
                 "qwen3_vl": ("model.language_model.layers.", "model.visual."),
                 "qwen3_vl_moe": ("model.language_model.layers.", "model.visual.")}[family]
    assert blocks == [published[1].rstrip(".")] + [published[0] + str(i) for i in range(3)]  # the tower first
    assert any(n.startswith(published[1]) for n in skeleton.state_dict())
    if family == "qwen3_vl_moe":  # unfused per expert, cut from the transposed stacked tensors
        assert "model.language_model.layers.0.mlp.experts.3.down_proj.weight" in skeleton.state_dict()


def test_experts_stacked_as_published_or_as_transformers_saves_them_load_alike(vlms, tmp_path):
    """Qwen3-VL-MoE is published with experts stacked [E, H, 2I] / [E, I, H]; transformers 5 re-saves them as
    [E, 2I, H] / [E, H, I]. Both read into the same per-expert weights."""
    from safetensors.torch import load_file, save_file

    resaved = tmp_path / "resaved"
    resaved.mkdir()
    for file in vlms["qwen3_vl_moe"].iterdir():
        if file.suffix != ".safetensors":
            (resaved / file.name).write_bytes(file.read_bytes())
    state = load_file(vlms["qwen3_vl_moe"] / "model.safetensors")
    save_file({k: v.transpose(1, 2).contiguous() if ".experts." in k else v for k, v in state.items()},
              resaved / "model.safetensors")
    published = adapter_of("qwen3_vl_moe", vlms["qwen3_vl_moe"]).init_model(CPU, load_layers=True).state_dict()
    transformers_layout = adapter_of("qwen3_vl_moe", resaved).init_model(CPU, load_layers=True).state_dict()
    assert published.keys() == transformers_layout.keys()
    assert all(torch.equal(published[k], transformers_layout[k]) for k in published)


# ---- float-exact transforms ----------------------------------------------------------------------------------
TRANSFORMS = {  # quarot alone: test_quarot_output_rotates_only_the_merger_of_the_vision_tower
    "iter_smooth": [{"type": "iter_smooth"}],
    "quarot+iter_smooth": [{"type": "quarot"}, {"type": "iter_smooth"}],
}
_ORIGINALS: dict[str, torch.nn.Module] = {}


def original_model(family: str, path: Path) -> torch.nn.Module:
    if family not in _ORIGINALS:
        _ORIGINALS[family] = adapter_of(family, path).init_model(CPU, load_layers=True)
    return _ORIGINALS[family]


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
    merger = {k for k in changed if "merger" in k}
    assert bool(merger) == transform.startswith("quarot")  # only the rotation touches the vision tower's output
    # the tower is a block, but has no smoothing subgraph or rotation: of it only the stream writers' rows rotate
    assert {k for k in changed if "visual." in k} == merger
    assert all(k.rsplit(".", 2)[-2] in ("linear_fc2", "2") for k in merger)


def test_quarot_must_rotate_the_vision_merger(vlms, images):
    """The image embeddings are scattered into the rotated residual stream: leaving the merger's output
    unrotated breaks the model on images (and only there)."""
    original = original_model("qwen3_vl", vlms["qwen3_vl"])
    broken = adapter_of("qwen3_vl", vlms["qwen3_vl"])
    broken.structure = replace(broken.structure, rotation=replace(broken.structure.rotation, outside_writers=()))
    model, (image_batch, text_batch) = transformed(broken, [{"type": "quarot"}],
                                                   image_samples(images[:1]) + ["a prompt without an image"])
    assert (logits(model, text_batch) - logits(original, text_batch)).abs().max() < FLOAT_BOUND
    assert (logits(model, image_batch) - logits(original, image_batch)).abs().max() > 1e-2


# ---- the vision tower as a block --------------------------------------------------------------------------------
def test_the_text_layers_are_calibrated_on_the_quantized_tower_output(vlms, images):
    """The runner hands the tower's request the output of its last calibration forward, taken before that step
    quantized it; the walk feeds the text layers what the quantized tower gives (what the served model feeds them)
    and the DeepStack features of the same tower."""
    adapter = adapter_of("qwen3_vl", vlms["qwen3_vl"])
    process = [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*visual.blocks*"]}]
    float_model = original_model("qwen3_vl", vlms["qwen3_vl"])
    model, (batch,) = transformed(adapter, process, image_samples(images[:1]))
    walk = adapter.generate_model_forward(model, batch)
    vision_request = next(walk)
    assert vision_request.name == "model.visual" and vision_request.module is model.get_submodule("model.visual")
    float_tower = float_model.get_submodule("model.visual")
    with torch.no_grad():
        first_text = walk.send(float_tower(*vision_request.args, **vision_request.kwargs))
    served, _ = adapter.capture_first_block_inputs(model, batch)  # the model's own forward, quantized tower
    unquantized, _ = adapter.capture_first_block_inputs(float_model, batch)
    assert first_text.name == "model.language_model.layers.0"
    assert torch.equal(first_text.args[0], served[0]) and not torch.equal(served[0], unquantized[0])
    delta = (walked_logits(adapter, model, batch) - logits(model, batch)).abs().max().item()
    print(f"qwen3_vl with a W8A8 dynamic tower: walk vs the model's forward max |Δlogit| {delta:.2e}")
    assert delta < 1e-5  # DeepStack features from the quantized tower too


def test_a_data_free_rule_quantizes_the_vision_linears_and_the_plan_lists_them(tmp_path, vlms, caplog):
    """W8A16 (no calibration) over `*visual*` with upstream's excludes: the plan lists the tower's block linears
    under the rule, with no warning that they stay float; the description says W8A16; the mergers stay float."""
    import json
    import logging

    from msmodelslim.format.ascendv1.checker import check_ascendv1

    w8a16 = {"weight": W8A8_STATIC["weight"], "act": {"dtype": "float", "method": "none"}}
    process = [{"type": "linear_quant", "qconfig": w8a16, "include": ["*visual*"], "exclude": UPSTREAM_EXCLUDES}]
    with caplog.at_level(logging.WARNING, logger="msmodelslim"):
        plan = write_ascendv1(adapter_of("qwen2_5_vl", vlms["qwen2_5_vl"]), process, [], tmp_path / "out", True)
    assert not [r for r in caplog.records if "outside the decoder layers" in r.getMessage()]
    vision = {n: s for n, s in plan.items() if n.startswith("visual.")}
    assert {s for n, s in vision.items() if "merger" not in n} == {"W8A16"}
    assert {s for n, s in vision.items() if "merger" in n} == {"FLOAT"}
    description = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    assert description["visual.blocks.1.mlp.down_proj.weight"] == "W8A16"
    assert description["visual.merger.mlp.2.weight"] == "FLOAT"
    assert not [f for f in check_ascendv1(tmp_path / "out", list(plan)) if f.level == "error"]


@pytest.mark.parametrize("family,finished", [("qwen2_5_vl", 0), ("qwen2_5_vl", 1), ("qwen3_vl", 2), ("qwen3_vl", 1)])
def test_a_resumed_walk_continues_exactly_from_the_saved_hidden_states(vlms, images, family, finished):
    """--resume fast-forwards each batch's walk (core/walk.py BatchWalks.fast_forward): the killed run's saved input of the
    next block is sent once per finished block, the vision tower's included; the walk then goes on exactly. Inside
    Qwen3-VL's DeepStack layers (the first 2 here) it refuses by name: the features are not in a checkpoint."""
    adapter = adapter_of(family, vlms[family])
    model = original_model(family, vlms[family])
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    want = walked_logits(adapter, model, batch)
    walk = adapter.generate_model_forward(model, batch)
    request = next(walk)
    with torch.no_grad():  # the uninterrupted walk up to text layer `finished`: its input is what was saved
        for _ in range(finished + 1):
            request = walk.send(request.module(*request.args, **request.kwargs))
    saved = request.args[0].clone()
    resumed = adapter.generate_model_forward(model, batch)
    next(resumed)
    for _ in range(finished + 1):  # the vision tower and the finished text layers
        request = resumed.send(saved)
    assert request.name == f"{adapter.structure.decoder_layers}.{finished}" and request.args[0] is saved
    if family == "qwen3_vl" and finished < 2:
        with pytest.raises(UnsupportedError, match="DeepStack"):
            finish_walk(adapter, model, resumed, request)
        return
    delta = (finish_walk(adapter, model, resumed, request) - want).abs().max().item()
    print(f"{family} resumed at text layer {finished}: max |Δlogit| {delta:.2e}")
    assert delta < 1e-5


def test_a_dry_run_estimates_from_a_text_layer(tmp_path, vlms, images, capsys):
    """`--dry_run` runs the vision tower once (it is the first block) and times the first text layer."""
    import yaml

    from msmodelslim.cli.__main__ import main

    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "quarot"}] + WITH_VISION, "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        "dataset": str(images[0].parent)}}))
    assert main(["quant", "--model_path", str(vlms["qwen3_vl"]), "--save_path", str(tmp_path / "out"), "--device",
                 "cpu", "--model_type", "Qwen3-VL-4B-Instruct", "--config_path", str(config), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "timing block model.language_model.layers.0" in printed and "model.visual run once" in printed
    assert "W8A8_DYNAMIC   model.visual.blocks.0.attn.qkv" in printed


# ---- calibration inputs ---------------------------------------------------------------------------------------
def test_unreadable_images_and_other_media_are_named(vlms, tmp_path):
    adapter = adapter_of("qwen2_5_vl", vlms["qwen2_5_vl"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InvalidDatasetError, match="broken.png"):
        adapter.handle_dataset([VlmCalibSample(PROMPT, broken)], CPU)
    with pytest.raises(UnsupportedError, match="audio"):
        adapter.handle_dataset([VlmCalibSample(PROMPT, audio=tmp_path / "a.wav")], CPU)


# ---- registry --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_model_types_are_registered_and_inferred(vlms, family):
    name, cls = FAMILIES[family]
    assert registry.adapter_class(name) is cls and cls.is_vlm
    assert registry.lookup(registry.infer_model_type(vlms[family])).target.endswith(cls.__name__)


# ---- output ------------------------------------------------------------------------------------------------------
W8A8_STATIC = {"act": {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"},
               "weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}
UPSTREAM_EXCLUDES = ["lm_head", "*merger*", "*deepstack_merger_list*"]
SMOOTH_AND_QUANTIZE = [{"type": "iter_smooth"},
                       {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*"], "exclude": UPSTREAM_EXCLUDES}]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer_config.json")


def write_ascendv1(adapter, process: list[dict], data, out: Path, layer_wise: bool,
                   compressed_tensors: bool = False) -> dict:
    """Quantize through the adapter and the runner as app/quantize.py does (plan on the skeleton, load, calibrate,
    walk, write), with the runner chosen here: a multimodal_vlm_modelslim_v1 config always runs layer_wise.
    `compressed_tensors`: write that format instead of ascendv1."""
    from msmodelslim.app.plan import plan_layers
    from msmodelslim.format.ascendv1.writer import AscendV1Writer
    from msmodelslim.format.compressed_tensors.writer import CompressedTensorsWriter
    from msmodelslim.format.edits import OutputEdits

    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape())
    processors = build_pipeline(config.spec.process, context)
    skeleton = adapter.init_skeleton()
    plan = plan_layers(config, processors, skeleton, adapter.block_names(skeleton))
    model = adapter.load_weights(skeleton, CPU, load_layers=not layer_wise, defer_output_head=layer_wise)
    out.mkdir()
    if compressed_tensors:
        writer = CompressedTensorsWriter(out, 4, adapter.global_dtype(), adapter.original_dtype,
                                         config_name=adapter.loader_module_name)
    else:
        writer = AscendV1Writer(out, 4, adapter.global_dtype(),
                                is_row_parallel=adapter.structure.is_row_parallel,
                                dtype_for=adapter.original_dtype)
    run_blocks(adapter, model, processors, writer, adapter.handle_dataset(data, CPU), CPU, layer_wise,
               unread=adapter.unread_tensors(skeleton))
    edits = OutputEdits()
    for processor in processors:
        edits = edits.merge(processor.output_edits())
    if compressed_tensors:
        writer.finish(adapter.model_path, edits, [n for n, s in plan.items() if s == "FLOAT"])
    else:
        writer.finish(adapter.model_path, edits)
    return plan


def stored(path: Path) -> dict[str, tuple[str, bytes]]:
    """{tensor name: (dtype, raw bytes)} of every safetensors file under `path`."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                out[name] = (str(tensor.dtype), tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return out


W8A8_DYNAMIC = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
                "weight": W8A8_STATIC["weight"]}
TEXT_ONLY = [{"type": "iter_smooth"},  # the vision tower excluded: it must come out as it went in
             {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*"],
              "exclude": UPSTREAM_EXCLUDES + ["*visual*"]}]
WITH_VISION = TEXT_ONLY + [  # the vision tower's block linears W8A8 dynamic; upstream's excludes keep the mergers float
    {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*visual*"], "exclude": UPSTREAM_EXCLUDES}]
READ_BACK_BOUND = 0.15  # relative logit error (‖Δ‖/‖logits‖) of a W8A8 model read back, image+prompt inputs


@pytest.mark.parametrize("family,dtype,process", [("qwen2_5_vl", torch.bfloat16, "with_vision"),
                                                  ("qwen3_vl", torch.float32, "text_only"),
                                                  ("qwen3_vl", torch.float32, "with_vision")])
def test_ascendv1_writes_the_vision_tower_as_its_rules_say_and_reads_back(tmp_path, images, family, dtype, process):
    """The vision tower is a block: a rule over its linears quantizes them (W8A8_DYNAMIC in the description, read
    back by our reader), the rest of it (mergers, patch embedding, norms), or all of it when no rule matches, is
    written byte for byte; layer_wise and model_wise write the same bytes; the processor files are copied."""
    import json

    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    source = make_tiny_vlm(tmp_path / "model", family, dtype=dtype)
    adapter = adapter_of(family, source)
    vision = adapter.layout.vision
    steps = {"text_only": TEXT_ONLY, "with_vision": WITH_VISION}[process]
    outs = {}
    runners = ("layer_wise", "model_wise") if family == "qwen2_5_vl" else ("layer_wise",)  # (time)
    for runner in runners:
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(family, source), steps, image_samples(images), outs[runner],
                              layer_wise=runner == "layer_wise")
    if "model_wise" in outs:
        assert stored(outs["layer_wise"]) == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    vision_linears = {n: s for n, s in plan.items() if n.startswith(vision + ".")}
    mergers = {n for n in vision_linears if "merger" in n}
    assert mergers and all(vision_linears[n] == "FLOAT" for n in mergers)  # upstream's excludes
    quantized_vision = {n for n, s in vision_linears.items() if s != "FLOAT"}
    if process == "with_vision":  # every block linear of the tower: attention qkv/proj and the MLP
        assert quantized_vision == set(vision_linears) - mergers
        assert {vision_linears[n] for n in quantized_vision} == {"W8A8_DYNAMIC"}
    else:
        assert not quantized_vision
    assert any(s == "W8A8" for n, s in plan.items() if not n.startswith(vision + "."))
    source_tensors, written = stored(source), stored(out)
    description = json.loads((out / "quant_model_description.json").read_text())
    for name in quantized_vision:
        assert description[f"{name}.weight"] == "W8A8_DYNAMIC" and written[f"{name}.weight"][0] == "torch.int8"
        assert description[f"{name}.weight_scale"] == "W8A8_DYNAMIC"
    untouched = [n for n in source_tensors if n.startswith(vision + ".") and n.rsplit(".", 1)[0] not in
                 quantized_vision]
    assert untouched and all(written[n] == source_tensors[n] for n in untouched)  # byte for byte
    assert all(description[n] == "FLOAT" for n in untouched)
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes()

    reference = adapter.init_model(CPU, load_layers=True)
    quantized = load_ascendv1(out)
    from msmodelslim.ir.quant_linear import QuantLinear

    read_as_quantized = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert quantized_vision and quantized_vision <= read_as_quantized if process == "with_vision" else True
    for batch in adapter.handle_dataset(image_samples(images), CPU):
        want, got = logits(reference, batch), logits(quantized, batch)
        relative = ((got - want).norm() / want.norm()).item()
        print(f"{family} ({dtype}) {process}: iter_smooth + W8A8 read back: relative logit error {relative:.3f}, "
              f"max |Δlogit| {(got - want).abs().max().item():.3f}")
        assert relative < READ_BACK_BOUND


@pytest.mark.parametrize("family,tie", [("qwen3_vl_moe", False), ("qwen3_vl", True)])
def test_quarot_output_rotates_only_the_merger_of_the_vision_tower(tmp_path, vlms, images, family, tie):
    """Written and read back, the rotated model is exact in float on an image; of the vision tower only the
    mergers' last linears changed; a tied embedding is untied (Qwen3-VL-4B ties)."""
    import json

    source = make_tiny_vlm(tmp_path / "tied", family, tie=True) if tie else vlms[family]
    adapter = adapter_of(family, source)
    write_ascendv1(adapter, [{"type": "quarot"}], [], tmp_path / "out", layer_wise=True)
    source_tensors, written = stored(source), stored(tmp_path / "out")
    vision = [n for n in source_tensors if n.startswith("model.visual.")]
    changed = sorted(n for n in vision if written[n] != source_tensors[n])
    assert changed == sorted(n for n in vision if n.rsplit(".", 1)[0].endswith("linear_fc2") and "merger" in n)
    if family == "qwen3_vl_moe":
        experts = "model.language_model.layers.0.mlp.experts"  # written one tensor set per expert (formats.md A.5)
        assert f"{experts}.3.down_proj.weight" in written and f"{experts}.gate_up_proj" not in written
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "lm_head.weight" in written and config["tie_word_embeddings"] is False
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    rotated = load_ascendv1(tmp_path / "out")
    reference = adapter.init_model(CPU, load_layers=True)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    delta = (logits(rotated, batch) - logits(reference, batch)).abs().max().item()
    print(f"{family} (tied: {tie}) quarot written and read back: max |Δlogit| {delta:.2e}")
    assert delta < FLOAT_BOUND


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_compressed_tensors_loads_in_transformers_generates_from_an_image_and_equals_our_reader(tmp_path, vlms,
                                                                                                images, family):
    """The same W8A8 dynamic run written both ways: transformers' image-text class (with the compressed-tensors
    library) computes what our ascendv1 reader computes, and generates from an image. Qwen2.5-VL's tensors keep
    their published names, its quantization_config names transformers' modules (renamed on load)."""
    from transformers import AutoModelForImageTextToText

    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.ir.quant_linear import QuantLinear

    source = vlms[family]
    dynamic = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
               "weight": W8A8_STATIC["weight"]}
    process = [{"type": "linear_quant", "qconfig": dynamic, "include": ["*"], "exclude": UPSTREAM_EXCLUDES}]
    write_ascendv1(adapter_of(family, source), process, [], tmp_path / "ct", True, compressed_tensors=True)
    write_ascendv1(adapter_of(family, source), process, [], tmp_path / "ascendv1", True)
    assert_our_readers_agree(tmp_path / "ct", tmp_path / "ascendv1",
                             adapter_of(family, source).handle_dataset(image_samples(images), CPU))
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                         local_files_only=True).eval()
    ours = load_ascendv1(tmp_path / "ascendv1")
    # compressed-tensors emulates dynamic int8 with max|x|/127.5 (kernels: /127), per token over dims (0, 1): an
    # input without a batch dimension, as the vision tower's [patches, hidden], it quantizes per tensor
    def ct_dynamic(x: torch.Tensor) -> torch.Tensor:
        scale = (x.abs().amax(-1, keepdim=True) if x.dim() > 2 else x.abs().amax()) / 127.5
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    for module in ours.modules():
        if isinstance(module, QuantLinear):
            module.quantize_input = ct_dynamic
    reference = original_model(family, source)
    for batch in adapter_of(family, source).handle_dataset(image_samples(images), CPU):
        want, got = logits(ours, batch), logits(theirs, batch)
        relative = ((got - want).norm() / want.norm()).item()
        drift = ((got - logits(reference, batch)).norm() / want.norm()).item()
        print(f"{family} compressed-tensors in transformers vs our reader: relative {relative:.1e} "
              f"(vs float {drift:.3f})")
        assert relative < 1e-3 and drift > 1e-3  # equal to ours, and quantized
    generated = theirs.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4
    if family == "qwen2_5_vl":
        import json

        config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
        targets = [t for group in config["config_groups"].values() for t in group["targets"]]
        assert "model.language_model.layers.0.self_attn.q_proj" in targets
        assert "model.visual.blocks.0.attn.qkv" in targets  # the vision tower's linears, quantized (rule "*")
        assert "model.visual.merger.mlp.2" in config["ignore"]
        written = stored(tmp_path / "ct")
        assert "model.layers.0.self_attn.q_proj.weight" in written  # the published tensor names
        assert written["visual.blocks.0.attn.qkv.weight"][0] == "torch.int8"


def test_cli_quant_check_and_read_back(tmp_path, vlms, images):
    """`msmodelslim quant` from a multimodal_vlm_modelslim_v1 YAML (an image directory paired with default_text),
    then `msmodelslim check`, then our reader on an image."""
    import yaml

    from msmodelslim.cli.__main__ import main
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    config = tmp_path / "qwen2_5_vl_w8a8.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": SMOOTH_AND_QUANTIZE, "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        "dataset": str(images[0].parent), "default_text": PROMPT}}))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(vlms["qwen2_5_vl"]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Qwen2.5-VL-7B-Instruct", "--config_path", str(config)]) == 0
    assert main(["check", str(out)]) == 0
    adapter = adapter_of("qwen2_5_vl", vlms["qwen2_5_vl"])
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    want, got = logits(original_model("qwen2_5_vl", vlms["qwen2_5_vl"]), batch), logits(load_ascendv1(out), batch)
    assert ((got - want).norm() / want.norm()).item() < 0.15


def test_a_checkpoint_of_another_family_or_layout_is_refused_before_any_weight_is_read(vlms, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from msmodelslim.core.errors import InvalidModelError

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(InvalidModelError, match="expects a checkpoint of type qwen3_vl"):
        Qwen3VlAdapter("Qwen3-VL-4B-Instruct", vlms["qwen2_5_vl"])
    renamed = tmp_path / "renamed"  # neither published layout: the vision tower under another prefix
    renamed.mkdir()
    for file in vlms["qwen2_5_vl"].iterdir():
        if file.suffix != ".safetensors":
            (renamed / file.name).write_bytes(file.read_bytes())
    monkeypatch.undo()
    state = load_file(vlms["qwen2_5_vl"] / "model.safetensors")
    save_file({k.replace("visual.", "vision_tower.", 1): v for k, v in state.items()}, renamed / "model.safetensors")
    with pytest.raises(InvalidModelError, match="neither the text layers and vision tower"):
        Qwen25VlAdapter("Qwen2.5-VL-7B-Instruct", renamed)


def test_upstream_qwen3_vl_moe_recipe_end_to_end(tmp_path, vlms, images):
    """protocol.md 3.4's qwen3_vl_moe_w8a8 row: quarot -> iter_smooth -> W8A8 static on attention, W8A8 dynamic on
    the experts, mergers and routers excluded; the checklist passes and our reader agrees with the float model."""
    import yaml

    from msmodelslim.cli.__main__ import main
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    dynamic = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
               "weight": W8A8_STATIC["weight"]}
    excludes = ["*linear_fc2", "*merger*", "*deepstack_merger_list*", "*mlp.gate"]
    config = tmp_path / "qwen3_vl_moe_w8a8.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "quarot"}, {"type": "iter_smooth"},
                    {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*"],
                     "exclude": ["*experts*", "lm_head", *excludes]},
                    {"type": "linear_quant", "qconfig": dynamic, "include": ["*experts*"], "exclude": excludes}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}], "dataset": str(images[0].parent)}}))
    out = tmp_path / "out"
    source = vlms["qwen3_vl_moe"]
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Qwen3-VL-30B-A3B", "--config_path", str(config)]) == 0
    assert main(["check", str(out)]) == 0
    import json

    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.language_model.layers.0.self_attn.q_proj.weight"] == "W8A8"
    assert description["model.language_model.layers.0.mlp.experts.0.gate_proj.weight"] == "W8A8_DYNAMIC"
    assert description["model.language_model.layers.0.mlp.gate.weight"] == "FLOAT"
    # the vision tower is a block: the rule "*" reaches its attention and fc1; the recipe's excludes keep fc2 and
    # the mergers float (and quarot rotated the mergers' output rows before anything was quantized)
    assert description["model.visual.blocks.0.attn.qkv.weight"] == "W8A8"
    assert description["model.visual.blocks.0.mlp.linear_fc1.weight"] == "W8A8"
    assert description["model.visual.blocks.0.mlp.linear_fc2.weight"] == "FLOAT"
    assert description["model.visual.merger.linear_fc1.weight"] == "FLOAT"
    adapter = adapter_of("qwen3_vl_moe", source)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    want, got = logits(original_model("qwen3_vl_moe", source), batch), logits(load_ascendv1(out), batch)
    relative = ((got - want).norm() / want.norm()).item()
    print(f"qwen3_vl_moe upstream w8a8 recipe read back: relative logit error {relative:.3f}")
    assert relative < 0.15


def test_quarot_refuses_an_unread_stream_writer_outside_every_block(vlms):
    """A writer into the residual stream (the merger) still unread at prepare_model is rotated when its block is
    read; one in no block of the walk would never be: refused instead of written unrotated."""
    from msmodelslim.core.errors import ProcessingError

    adapter = adapter_of("qwen2_5_vl", vlms["qwen2_5_vl"])
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "quarot"}]}})
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape())
    quarot = build_pipeline(config.spec.process, context)[0]
    skeleton = adapter.init_skeleton()
    blocks = adapter.block_names(skeleton)
    quarot.check_model(skeleton, [b for b in blocks if b != adapter.layout.vision])  # the tower left out of the walk
    model = adapter.load_weights(skeleton, CPU, load_layers=False)
    with pytest.raises(ProcessingError, match=r"visual\.merger\.mlp\.2 .*would never be rotated"):
        quarot.prepare_model(model)


def test_gptaq_walks_the_float_model_with_its_deepstack_features(vlms, images, monkeypatch):
    """GPTAQ's float stream (core/reference.py) goes through the adapter's own walk: each text layer's float-model
    input is the float model's, DeepStack's visual features added after the first layers included."""
    from msmodelslim.core.reference import ReferenceStream

    seen = []
    real = ReferenceStream.advance

    def advance(self, outputs):
        real(self, outputs)
        seen.extend((r.name, r.args[0].clone()) for r in self.requests if r is not None)

    monkeypatch.setattr(ReferenceStream, "advance", advance)
    weight = {"dtype": "int4", "scope": "per_channel", "symmetric": True, "method": "gptq", "ext": {"gptaq_alpha": 0.25}}
    config = parse_config({"apiversion": "modelslim_v1", "spec": {
        "calibration": {"next_block_inputs": "quantized", "early_stop": False},
        "process": [{"type": "linear_quant", "qconfig": {"weight": weight}, "include": ["*language_model.layers*"]}]}})
    adapter = adapter_of("qwen3_vl", vlms["qwen3_vl"])
    processors = build_pipeline(config.spec.process, ProcessorContext(type(adapter).__name__, adapter.structure,
                                                                      adapter.attention_shape()))
    model = adapter.load_weights(adapter.init_skeleton(), CPU, load_layers=True)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    run_blocks(adapter, model, processors, None, [batch], CPU, layer_wise=False, quantized_inputs=True)
    expected, walk = [], adapter.generate_model_forward(original_model("qwen3_vl", vlms["qwen3_vl"]), batch)
    request = next(walk)
    with torch.no_grad():
        while True:
            try:
                request = walk.send(request.module(*request.args, **request.kwargs))
            except StopIteration:
                break
            expected.append((request.name, request.args[0]))
    assert [n for n, _ in seen] == [n for n, _ in expected] and len(expected) >= 3
    for (name, got), (_, want) in zip(seen, expected):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
