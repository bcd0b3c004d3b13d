"""Qwen3.5 / Qwen3.6 (model/vlm_qwen3_5.py) on tiny random checkpoints (tests/tiny_vlm.py: dense and MoE, Gated
DeltaNet layers 0 and 2, gated full attention 1 and 3, a published-style `mtp.*` module) saved under the published
names: the block-by-block walk equals transformers on image+prompt inputs; every published tensor is read by its
own name but the MTP module, which is written through unchanged (FLOAT); experts stacked in transformers' layout
load as the per-expert ones; smoothing is exact in float and leaves the vision tower alone; QuaRot is exact in float
(zero-centred norms, the vision merger's output rotated) and breaks when any one reader or writer is skipped, and is
refused by name on a checkpoint holding the MTP module; a W8A8 run (also after quarot -> iter_smooth) over the text
layers, the experts and the vision blocks writes the same bytes layer_wise and model_wise, keeps every untouched
vision tensor byte for byte, passes the checker and reads back (our reader and the reference reader) close to float
on image+prompt logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model import registry
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.model.vlm_qwen3_5 import LINEAR_ATTENTION_READERS, Qwen35VlAdapter
from test_vlm_models import (W8A8_DYNAMIC, W8A8_STATIC, assert_our_readers_agree, stored, transformed,
                             write_ascendv1)
from tiny_vlm import image_samples, make_tiny_vlm

CPU = torch.device("cpu")
FAMILIES = {"qwen3_5": "Qwen3.5-27B", "qwen3_5_moe": "Qwen3.5-35B-A3B"}
# max |Δlogit| / max |logit| of a float-exact transform: float32 rounding of the folded weights (<= 1.6e-5
# measured); a wrong fold (test_smoothing_needs_the_norm_offset) is > 100x that
FLOAT_BOUND = 1e-4
# max |Δlogit| of the same float model run two ways: unfused experts add up in another order than transformers'
# grouped_mm (1e-7 after layer 0, routes equal), which the Gated DeltaNet layers amplify (2.5e-6 at the logits)
SAME_MODEL = 1e-5
MTP = ("mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.layers.0.self_attn.o_proj.weight")


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    return {family: make_tiny_vlm(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def adapter_of(family: str, path: Path) -> Qwen35VlAdapter:
    return Qwen35VlAdapter(FAMILIES[family], path)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def walked_logits(adapter, model, batch) -> torch.Tensor:
    """The adapter's block-by-block forward (what calibration sees), then the final norm and the head."""
    forward = adapter.generate_model_forward(model, batch)
    request = next(forward)
    with torch.no_grad():
        while True:
            output = request.module(*request.args, **request.kwargs)
            try:
                request = forward.send(output)
            except StopIteration:
                break
        hidden = model.get_submodule(f"{adapter.layout.text}.norm")(block_hidden_state(output))
        return model.get_submodule("lm_head")(hidden).float()


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
        assert (logits(model, batch) - want).abs().max() < SAME_MODEL  # the published names loaded alike
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"{family}: walk vs transformers max |Δlogit| {delta:.2e}")
        assert delta < SAME_MODEL


@pytest.mark.parametrize("family", FAMILIES)
def test_names_are_published_and_the_mtp_module_passes_through(vlms, family):
    from msmodelslim.model.skeleton_edits import EngineFloatLinear

    adapter = adapter_of(family, vlms[family])
    assert adapter.family.hf_model_type == family and adapter.family.moe == (family == "qwen3_5_moe")
    skeleton = adapter.init_skeleton()
    assert sorted(adapter.unused_checkpoint_tensors(skeleton)) == sorted(MTP)  # everything else by its own name
    unread = adapter.unread_tensors(skeleton)
    assert [(g.name, sorted(g.tensors)) for g in unread.mtp_layers()] == [("mtp", sorted(MTP))]
    text = "model.language_model.layers"
    assert adapter.block_names(skeleton) == ["model.visual"] + [f"{text}.{i}" for i in range(4)]
    for name in (f"{text}.0.linear_attn.in_proj_b", f"{text}.2.linear_attn.in_proj_a"):
        assert isinstance(skeleton.get_submodule(name), EngineFloatLinear)  # the engine builds them unquantized
    names = skeleton.state_dict()
    assert f"{text}.1.self_attn.q_proj.weight" in names and f"{text}.0.linear_attn.in_proj_qkv.weight" in names
    if family == "qwen3_5_moe":  # unfused per expert, as published
        assert f"{text}.3.mlp.experts.3.down_proj.weight" in names
        assert isinstance(skeleton.get_submodule(f"{text}.0.mlp.shared_expert_gate"), EngineFloatLinear)


def test_experts_stacked_as_transformers_holds_them_load_as_the_published_per_expert_ones(vlms, tmp_path):
    """vLLM reads Qwen3.5-MoE experts per expert or stacked [E, 2I, H] / [E, H, I] (not transposed); both load
    into the same per-expert weights."""
    from safetensors.torch import load_file, save_file

    source = vlms["qwen3_5_moe"]
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (stacked / file.name).write_bytes(file.read_bytes())
    state = load_file(source / "model.safetensors")
    restacked = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for layer in range(4):
        prefix = f"model.language_model.layers.{layer}.mlp.experts"
        e = range(4)
        restacked[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{prefix}.{i}.gate_proj.weight"], state[f"{prefix}.{i}.up_proj.weight"]]) for i in e])
        restacked[f"{prefix}.down_proj"] = torch.stack([state[f"{prefix}.{i}.down_proj.weight"] for i in e])
    save_file(restacked, stacked / "model.safetensors")
    published = adapter_of("qwen3_5_moe", source).init_model(CPU, load_layers=True).state_dict()
    from_stacked = adapter_of("qwen3_5_moe", stacked).init_model(CPU, load_layers=True).state_dict()
    assert published.keys() == from_stacked.keys()
    assert all(torch.equal(published[k], from_stacked[k]) for k in published)


# ---- float-exact transforms ----------------------------------------------------------------------------------
def logit_change(original, model, batches) -> float:
    """max |Δlogit| / max |logit| over every position of every batch."""
    pairs = [(logits(model, b), logits(original, b)) for b in batches]
    return max((a - b).abs().max().item() for a, b in pairs) / max(b.abs().max().item() for _, b in pairs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", ["iter_smooth", "flex_smooth_quant"])
def test_smoothing_is_exact_in_float_on_images_and_leaves_the_tower_alone(vlms, images, family, transform):
    data = image_samples(images[:2]) + ["a prompt without an image"]
    original = adapter_of(family, vlms[family]).init_model(CPU, load_layers=True)
    model, batches = transformed(adapter_of(family, vlms[family]), [{"type": transform}], data)
    change = logit_change(original, model, batches)
    print(f"{family} {transform}: max |Δlogit| / max |logit| {change:.2e} on image+prompt")
    assert change < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    text = "model.language_model.layers"
    assert any(k.startswith(f"{text}.1.self_attn.q_proj.") for k in changed)  # full attention
    assert any(k.startswith(f"{text}.0.linear_attn.in_proj_qkv.") for k in changed)  # linear attention
    assert not {k for k in changed if k.startswith("model.visual.")}


def test_smoothing_needs_the_norm_offset(vlms, images):
    """Every norm scales by (1 + weight): folding the scale into the weight as for a plain RMSNorm breaks the
    model (the test above can fail)."""
    from dataclasses import replace

    original = adapter_of("qwen3_5", vlms["qwen3_5"]).init_model(CPU, load_layers=True)
    broken = adapter_of("qwen3_5", vlms["qwen3_5"])
    broken.structure = replace(broken.structure, norm_offset=0.0)
    model, batches = transformed(broken, [{"type": "iter_smooth"}], image_samples(images[:1]))
    change = logit_change(original, model, batches)
    print(f"qwen3_5 iter_smooth WITHOUT the norm offset (must break): {change:.2e}")
    assert change > 100 * FLOAT_BOUND


def without_mtp(source: Path, path: Path) -> Path:
    """A copy of the checkpoint without its `mtp.*` tensors (quarot refuses the MTP module: see below)."""
    from safetensors.torch import load_file, save_file

    path.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (path / file.name).write_bytes(file.read_bytes())
    (weights,) = source.glob("*.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("mtp.")}, path / weights.name,
              metadata={"format": "pt"})
    return path


def rotation_changed(adapter: Qwen35VlAdapter, **changes) -> Qwen35VlAdapter:
    from dataclasses import replace

    adapter.structure = replace(adapter.structure, rotation=replace(adapter.structure.rotation, **changes))
    return adapter


def without_reader(adapter: Qwen35VlAdapter, norm: str, reader: str) -> Qwen35VlAdapter:
    """The rotation with one reader of `norm` forgotten (listed as not reading the stream, so check_model lets it
    pass): its columns are neither folded nor rotated."""
    rotation = adapter.structure.rotation
    readers = tuple((n, tuple(r for r in names if r != reader) if n == norm else names)
                    for n, names in rotation.norm_readers)
    assert readers != rotation.norm_readers
    return rotation_changed(adapter, norm_readers=readers, not_readers=(reader,))


def without_writer(adapter: Qwen35VlAdapter, writer: str) -> Qwen35VlAdapter:
    rotation = adapter.structure.rotation
    assert writer in rotation.writers
    return rotation_changed(adapter, writers=tuple(w for w in rotation.writers if w != writer),
                            not_readers=(writer,))


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_is_exact_in_float_on_images(vlms, images, family):
    """The residual stream rotated (zero-centred norms folded as 1 + weight and left at weight 0), the vision
    merger's output rows too: the logits do not move on image+prompt or text inputs. Of the tower only the merger's
    last linear changed; every text reader and writer kind changed."""
    data = image_samples(images[:2]) + ["a prompt without an image"]
    original = adapter_of(family, vlms[family]).init_model(CPU, load_layers=True)
    model, batches = transformed(adapter_of(family, vlms[family]), [{"type": "quarot"}], data)
    change = logit_change(original, model, batches)
    delta = max((logits(model, b) - logits(original, b)).abs().max().item() for b in batches)
    print(f"{family} quarot: max |Δlogit| {delta:.2e}, / max |logit| {change:.2e} on image+prompt")
    assert change < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.startswith("model.visual.")} == {"model.visual.merger.linear_fc2.weight",
                                                                    "model.visual.merger.linear_fc2.bias"}
    text = "model.language_model"
    kinds = [f"{text}.layers.1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    kinds += [f"{text}.layers.0.linear_attn.{n}" for n in (*LINEAR_ATTENTION_READERS, "out_proj")]
    kinds += [f"{text}.embed_tokens", "lm_head"]
    if family == "qwen3_5_moe":
        kinds += [f"{text}.layers.2.mlp.{n}" for n in ("gate", "experts.1.gate_proj", "experts.1.up_proj",
                                                       "experts.1.down_proj", "shared_expert.gate_proj",
                                                       "shared_expert.down_proj", "shared_expert_gate")]
    else:
        kinds += [f"{text}.layers.2.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(f"{k}.weight" in changed for k in kinds)
    norms = [k for k in after if k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))
             and k.startswith(text)] + [f"{text}.norm.weight"]
    assert norms and all(after[k].abs().max() == 0 for k in norms)  # gain 1 + 0: folded into the readers


BROKEN_ROTATIONS = {  # each leaves one reader or writer of the residual stream (or the norm offset) out
    "merger not rotated": lambda a: rotation_changed(a, outside_writers=()),
    "in_proj_a not a reader": lambda a: without_reader(a, "input_layernorm", "linear_attn.in_proj_a"),
    "k_proj not a reader": lambda a: without_reader(a, "input_layernorm", "self_attn.k_proj"),
    "out_proj not a writer": lambda a: without_writer(a, "linear_attn.out_proj"),
    "o_proj not a writer": lambda a: without_writer(a, "self_attn.o_proj"),
    "norm offset 0": lambda a: rotation_changed(a, norm_offset=0.0),
}
BROKEN_MOE_ROTATIONS = {
    "shared_expert_gate not a reader": lambda a: without_reader(a, "post_attention_layernorm",
                                                                "mlp.shared_expert_gate"),
    "experts' down not a writer": lambda a: without_writer(a, "mlp.experts.*.down_proj"),
}


@pytest.mark.parametrize("family,broken", [("qwen3_5", b) for b in BROKEN_ROTATIONS]
                         + [("qwen3_5_moe", b) for b in BROKEN_MOE_ROTATIONS])
def test_quarot_without_one_reader_or_writer_breaks_the_model(vlms, images, family, broken):
    """The test above can fail: a rotation that skips any one of them moves the logits far past the bound."""
    original = adapter_of(family, vlms[family]).init_model(CPU, load_layers=True)
    rules = {**BROKEN_ROTATIONS, **BROKEN_MOE_ROTATIONS}
    model, batches = transformed(rules[broken](adapter_of(family, vlms[family])), [{"type": "quarot"}],
                                 image_samples(images[:1]))
    change = logit_change(original, model, batches)
    print(f"{family} quarot with {broken} (must break): {change:.2e}")
    assert change > 100 * FLOAT_BOUND


def test_quarot_is_refused_by_name_when_the_checkpoint_holds_the_mtp_module(vlms):
    """vLLM's draft model reads the main model's embedding and post-final-norm hidden state and ends in the main
    model's head: once those are rotated (the final norm's gain folded into the head) the unrotated MTP module is
    wrong, and no rotation of its own tensors gives it back its norm into that head. Refused before any weight is
    read (core/passthrough.py), naming the module."""
    from msmodelslim.core.config import parse_config
    from msmodelslim.core.passthrough import refuse_inconsistent_passthrough
    from msmodelslim.processor.base import ProcessorContext, build_pipeline

    adapter = adapter_of("qwen3_5_moe", vlms["qwen3_5_moe"])
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "quarot"}]}})
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape())
    processors = build_pipeline(config.spec.process, context)
    skeleton = adapter.init_skeleton()
    for processor in processors:
        processor.check_model(skeleton, adapter.block_names(skeleton))  # the structure itself is accepted
    with pytest.raises(UnsupportedError, match="quarot cannot rotate the multi-token-prediction layer.*mtp"):
        refuse_inconsistent_passthrough(processors, adapter.unread_tensors(skeleton), adapter.model_path)


# ---- output ------------------------------------------------------------------------------------------------------
UPSTREAM_EXCLUDES = ["lm_head", "*merger*", "*linear_fc2*", "mtp*"]
PROCESS = [  # the recipes' schemes, widened to the linear attention and a static one: every kind in one run
    {"type": "iter_smooth"},
    {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*self_attn*"], "exclude": UPSTREAM_EXCLUDES},
    {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*linear_attn*", "*mlp*", "*visual.blocks*"],
     "exclude": UPSTREAM_EXCLUDES}]
# Relative logit error (‖Δ‖/‖logits‖) of the W8A8 model read back, image+prompt inputs: 0.06-0.08 measured; a
# wrong layout or scale gives ~1. The tiny random Gated DeltaNet layers are sensitive (1% noise on in_proj_qkv's
# weights moves the logits by 4%), more so with norm gains of 2 (tests/tiny_vlm.py: ZERO_CENTRED_NORMS).
READ_BACK_BOUND = 0.15
READER_AGREEMENT = 2e-3  # max |Δlogit| / max |logit| between our reader and the reference reader


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_writes_the_same_bytes_both_ways_keeps_the_tower_and_reads_back(tmp_path, vlms, images, family):
    from transformers import AutoModelForImageTextToText

    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    source = vlms[family]
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(family, source), PROCESS, image_samples(images), outs[runner],
                              layer_wise=runner == "layer_wise")
    written = stored(outs["layer_wise"])
    assert written == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    text = "model.language_model.layers"
    expected = {f"{text}.1.self_attn.q_proj": "W8A8", f"{text}.0.linear_attn.in_proj_qkv": "W8A8_DYNAMIC",
                f"{text}.0.linear_attn.in_proj_z": "W8A8_DYNAMIC", f"{text}.2.linear_attn.out_proj": "W8A8_DYNAMIC",
                f"{text}.0.linear_attn.in_proj_b": "FLOAT", "model.visual.blocks.0.attn.qkv": "W8A8_DYNAMIC",
                "model.visual.blocks.1.mlp.linear_fc2": "FLOAT", "model.visual.merger.linear_fc2": "FLOAT"}
    if family == "qwen3_5_moe":
        expected.update({f"{text}.0.mlp.experts.2.up_proj": "W8A8_DYNAMIC", f"{text}.3.mlp.shared_expert_gate": "FLOAT",
                         f"{text}.0.mlp.shared_expert.down_proj": "W8A8_DYNAMIC", f"{text}.0.mlp.gate": "FLOAT"})
    else:
        expected[f"{text}.3.mlp.down_proj"] = "W8A8_DYNAMIC"
    assert {n: plan.get(n, "FLOAT") for n in expected} == expected
    description = json.loads((out / "quant_model_description.json").read_text())
    source_tensors = stored(source)
    for name in MTP:  # the MTP module: written unchanged (bf16 as published), FLOAT
        assert written[name] == source_tensors[name] and description[name] == "FLOAT"
    untouched = [n for n in source_tensors  # the tower's tensors no rule quantized: mergers, norms, patch embedding
                 if n.startswith("model.visual.") and plan.get(n.rsplit(".", 1)[0], "FLOAT") == "FLOAT"]
    assert untouched and all(written[n] == source_tensors[n] for n in untouched)  # byte for byte

    float_model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    adapter = adapter_of(family, source)
    probe = adapter.handle_dataset(image_samples(images[1:]), CPU)
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    for batch in probe:
        want, got, ref = logits(float_model, batch), logits(ours, batch), logits(reference, batch)
        error = ((got - want).norm() / want.norm()).item()
        agreement = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"{family} W8A8 read back: relative logit error {error:.3f}; readers differ by {agreement:.1e}")
        assert error < READ_BACK_BOUND and agreement < READER_AGREEMENT


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_then_w8a8_writes_the_same_bytes_both_ways_and_reads_back(tmp_path, vlms, images, family):
    """quarot -> iter_smooth -> W8A8 (a checkpoint without the MTP module, which quarot refuses): identical bytes
    layer_wise and model_wise, the checker passes, of the tower only the quantized blocks and the merger's last
    linear changed, and our reader and the reference reader read back close to the float model."""
    from transformers import AutoModelForImageTextToText

    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    source = without_mtp(vlms[family], tmp_path / "source")
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(family, source), [{"type": "quarot"}] + PROCESS, image_samples(images),
                              outs[runner], layer_wise=runner == "layer_wise")
    written = stored(outs["layer_wise"])
    assert written == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    source_tensors = stored(source)
    vision_changed = {n for n in source_tensors if n.startswith("model.visual.") and written[n] != source_tensors[n]
                      and plan.get(n.rsplit(".", 1)[0], "FLOAT") == "FLOAT"}
    assert vision_changed == {"model.visual.merger.linear_fc2.weight", "model.visual.merger.linear_fc2.bias"}

    float_model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    probe = adapter_of(family, source).handle_dataset(image_samples(images[1:]), CPU)
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    for batch in probe:
        want, got, ref = logits(float_model, batch), logits(ours, batch), logits(reference, batch)
        error = ((got - want).norm() / want.norm()).item()
        agreement = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"{family} quarot + iter_smooth + W8A8 read back: relative logit error {error:.3f}; readers differ by "
              f"{agreement:.1e}")
        assert error < READ_BACK_BOUND and agreement < READER_AGREEMENT


@pytest.mark.parametrize("family", ["qwen3_5"])
def test_compressed_tensors_loads_in_transformers_and_equals_our_reader(tmp_path, vlms, images, family):
    """The same W8A8 dynamic run written both ways: transformers' image-text class (with the compressed-tensors
    library) computes what our ascendv1 reader computes on images, and generates from one. Dense only: transformers
    5.24 merges Qwen3.5-MoE's per-expert tensors into its fused experts on load, which fails on quantized experts
    ("Concatenate on tensors destined for ...experts.gate_up_proj. Ckpt contains: 0")."""
    from transformers import AutoModelForImageTextToText

    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.ir.quant_linear import QuantLinear

    source = vlms[family]
    process = [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"], "exclude": UPSTREAM_EXCLUDES}]
    write_ascendv1(adapter_of(family, source), process, [], tmp_path / "ct", True, compressed_tensors=True)
    write_ascendv1(adapter_of(family, source), process, [], tmp_path / "ascendv1", True)
    assert_our_readers_agree(tmp_path / "ct", tmp_path / "ascendv1",
                             adapter_of(family, source).handle_dataset(image_samples(images[:2]), CPU))
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                         local_files_only=True).eval()
    ours = load_ascendv1(tmp_path / "ascendv1")

    def ct_dynamic(x: torch.Tensor) -> torch.Tensor:  # compressed-tensors' emulation (test_vlm_models.py)
        scale = (x.abs().amax(-1, keepdim=True) if x.dim() > 2 else x.abs().amax()) / 127.5
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    for module in ours.modules():
        if isinstance(module, QuantLinear):
            module.quantize_input = ct_dynamic
    float_model = adapter_of(family, source).init_model(CPU, load_layers=True)
    for batch in adapter_of(family, source).handle_dataset(image_samples(images[:2]), CPU):
        want, got = logits(ours, batch), logits(theirs, batch)
        relative = ((got - want).norm() / want.norm()).item()
        drift = ((got - logits(float_model, batch)).norm() / want.norm()).item()
        print(f"{family} compressed-tensors in transformers vs our reader: relative {relative:.1e} (vs float "
              f"{drift:.3f})")
        assert relative < 1e-3 and drift > 1e-3  # equal to ours, and quantized
    generated = theirs.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4


def test_the_practice_runs_from_the_cli_and_eval_scores_it(vlms, tmp_path):
    """`--quant_type w8a8` on Qwen3.5-35B-A3B resolves to its multimodal_vlm_modelslim_v1 practice (upstream's recipe,
    calibImages), then `msmodelslim eval` scores the output on held-out image+prompt pairs: the float row is zero,
    the quantized row positive and finite."""
    import math

    from msmodelslim.app.evaluate_vlm import evaluate_vlm
    from msmodelslim.cli.__main__ import main

    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(vlms["qwen3_5_moe"]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Qwen3.5-35B-A3B", "--quant_type", "w8a8"]) == 0
    assert "config_id: qwen3_5_moe-w8a8" in (out / "Qwen3.5-35B-A3B_best_practice.yaml").read_text()
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.language_model.layers.1.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert description["model.language_model.layers.1.self_attn.o_proj.weight"] == "FLOAT"  # the recipe's exclude
    assert description["mtp.fc.weight"] == "FLOAT"
    report = evaluate_vlm(vlms["qwen3_5_moe"], out, None, CPU, max_samples=2, max_new_tokens=4)
    print(report.table())
    assert report.float.kl == 0.0 and report.float.top1 == 1.0
    assert math.isfinite(report.quantized.kl) and report.quantized.kl > 0


# ---- registry --------------------------------------------------------------------------------------------------
def test_model_types_are_registered_inferred_and_no_longer_planned(vlms):
    from msmodelslim.core.roadmap import PLANNED_MODEL_FAMILIES

    names = ["Qwen3.5-397B-A17B", "Qwen3.5-27B", "Qwen3.5-122B-A10B", "Qwen3.5-35B-A3B", "Qwen3.6-27B"]
    assert all(registry.adapter_class(n) is Qwen35VlAdapter for n in names) and Qwen35VlAdapter.is_vlm
    assert "qwen3_5_moe" not in PLANNED_MODEL_FAMILIES
    for family in FAMILIES:
        assert registry.lookup(registry.infer_model_type(vlms[family])).target.endswith("Qwen35VlAdapter")
