"""The Omni thinkers (model/vlm_omni.py: Qwen2.5-Omni-7B, Qwen3-Omni-30B-A3B) on tiny random checkpoints
(tests/tiny_vlm.py make_tiny_omni: the whole model's config.json, the thinker under its published `thinker.*` names,
a few talker/vocoder tensors): transformers' thinker class loads the published names (its conversion mapping) and
computes what the adapter's block-by-block walk computes on image+prompt inputs; the speech parts pass through
unchanged; smoothing is exact in float and leaves both towers alone; QuaRot is exact in float on image, video,
audio (a hand-made clip: calibration takes no audio) and text inputs, rotating of the towers only their writers into
the residual stream (leaving either unrotated breaks that medium); a W8A8 run (with or without QuaRot first) writes
the same bytes layer_wise and model_wise, keeps every untouched vision and audio tensor byte for byte, passes the
checker and reads back (our reader and the reference reader) close to float; video files and audio calibration are
refused by name before any weight is read."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msmodelslim.core.dataset import LAB_CALIB
from msmodelslim.core.errors import InvalidDatasetError, UnsupportedError
from msmodelslim.core.vlm_dataset import VlmCalibSample, load_vlm_samples
from msmodelslim.model import registry
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.model.vlm_omni import OmniThinkerAdapter, Qwen3OmniMoeThinkerAdapter
from test_vlm_models import W8A8_DYNAMIC, W8A8_STATIC, assert_our_readers_agree, stored, transformed, write_ascendv1
from tiny_vlm import PROMPT, image_samples, make_tiny_omni

CPU = torch.device("cpu")
FAMILIES = {"qwen2_5_omni": ("Qwen2.5-Omni-7B", OmniThinkerAdapter),
            "qwen3_omni_moe": ("Qwen3-Omni-30B-A3B-Thinking", Qwen3OmniMoeThinkerAdapter)}
SPEECH = {"qwen2_5_omni": ("talker.model.layers.0.self_attn.q_proj.weight", "talker.model.norm.weight",
                           "token2wav.decoder.proj.weight"),
          "qwen3_omni_moe": ("talker.model.layers.0.self_attn.q_proj.weight", "talker.model.norm.weight",
                             "code2wav.decoder.proj.weight")}
TEXT = "thinker.model.layers"
# max |Δlogit| of the same float model run two ways (transformers' thinker class vs the walk): 0 for the dense
# thinker; unfused experts add up in another order than transformers' grouped experts (~1e-7)
SAME_MODEL = 1e-5
FLOAT_BOUND = 1e-4  # max |Δlogit| / max |logit| of a float-exact transform (float32 rounding of folded weights)


@pytest.fixture(scope="module")
def omnis(tmp_path_factory) -> dict[str, Path]:
    return {family: make_tiny_omni(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def video_samples(count: int = 2) -> list[VlmCalibSample]:
    """The built-in calibVideos set's last entries: a clip alone, and a clip with a still image."""
    return load_vlm_samples("calibVideos", PROMPT)[-count:]


def adapter_of(family: str, path: Path):
    name, cls = FAMILIES[family]
    return cls(name, path)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def transformers_thinker(family: str, path: Path):
    """transformers' own thinker class on the published checkpoint (its conversion mapping renames `thinker.*`)."""
    import transformers

    cls = {"qwen2_5_omni": transformers.Qwen2_5OmniThinkerForConditionalGeneration,
           "qwen3_omni_moe": transformers.Qwen3OmniMoeThinkerForConditionalGeneration}[family]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def walked_logits(adapter, model, batch) -> torch.Tensor:
    forward = adapter.generate_model_forward(model, batch)
    request = next(forward)
    with torch.no_grad():
        while True:
            output = request.module(*request.args, **request.kwargs)
            try:
                request = forward.send(output)
            except StopIteration:
                break
        hidden = model.get_submodule("thinker.model.norm")(block_hidden_state(output))
        return model.get_submodule("thinker.lm_head")(hidden).float()


# ---- structure and forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_walk_equals_transformers_thinker_on_image_and_text(omnis, images, family):
    adapter = adapter_of(family, omnis[family])
    model = adapter.init_model(CPU, load_layers=True)
    reference = transformers_thinker(family, omnis[family])
    batches = adapter.handle_dataset(image_samples(images[:2]) + ["a prompt without an image"] + video_samples(), CPU)
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[2]
    assert "pixel_values_videos" in batches[3] and "pixel_values" not in batches[3]  # a clip
    assert {"pixel_values", "pixel_values_videos"} <= set(batches[4])  # a clip and a still image
    for batch in batches:
        want = logits(reference, batch)
        assert (logits(model, batch) - want).abs().max() < SAME_MODEL  # the published names loaded alike
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"{family}: walk vs transformers' thinker max |Δlogit| {delta:.2e} ({sorted(batch)})")
        assert delta < SAME_MODEL


@pytest.mark.parametrize("family", FAMILIES)
def test_names_are_published_and_the_speech_parts_pass_through(omnis, family):
    adapter = adapter_of(family, omnis[family])
    skeleton = adapter.init_skeleton()
    assert sorted(adapter.unused_checkpoint_tensors(skeleton)) == sorted(SPEECH[family])  # all else by its name
    assert sorted(adapter.unread_tensors(skeleton).passthrough_names) == sorted(SPEECH[family])
    assert adapter.block_names(skeleton) == ["thinker.visual"] + [f"{TEXT}.{i}" for i in range(3)]
    names = skeleton.state_dict()
    assert {"thinker.model.embed_tokens.weight", "thinker.lm_head.weight", "thinker.model.norm.weight",
            f"{TEXT}.0.self_attn.q_proj.weight"} <= set(names)
    assert any(n.startswith("thinker.audio_tower.") for n in names)
    if family == "qwen3_omni_moe":
        assert f"{TEXT}.2.mlp.experts.3.down_proj.weight" in names
    assert adapter.loader_module_name(f"{TEXT}.1.mlp.down_proj") == "model.language_model.layers.1.mlp.down_proj"
    assert adapter.loader_module_name("thinker.visual.blocks.0.attn.qkv") == "model.visual.blocks.0.attn.qkv"


# ---- float-exact transforms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", ["iter_smooth", "flex_smooth_quant"])
def test_smoothing_is_exact_in_float_on_images_and_leaves_the_towers_alone(omnis, images, family, transform):
    data = image_samples(images[:2]) + ["a prompt without an image"]
    original = adapter_of(family, omnis[family]).init_model(CPU, load_layers=True)
    model, batches = transformed(adapter_of(family, omnis[family]), [{"type": transform}], data)
    pairs = [(logits(model, b), logits(original, b)) for b in batches]
    change = max((a - b).abs().max().item() for a, b in pairs) / max(b.abs().max().item() for _, b in pairs)
    print(f"{family} {transform}: max |Δlogit| / max |logit| {change:.2e} on image+prompt")
    assert change < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(f"{TEXT}.1.self_attn.q_proj.") for k in changed)
    assert not {k for k in changed if k.startswith(("thinker.visual.", "thinker.audio_tower."))}


# ---- quarot: the residual stream rotates, and so do both towers' writers into it ----------------------------------
VISION_WRITERS = {"qwen2_5_omni": ("thinker.visual.merger.mlp.2",),
                  "qwen3_omni_moe": ("thinker.visual.merger.mlp.2", "thinker.visual.merger_list.0.mlp.2",
                                     "thinker.visual.merger_list.1.mlp.2")}  # DeepStack after text layers 0 and 1
AUDIO_WRITER = {"qwen2_5_omni": "thinker.audio_tower.proj", "qwen3_omni_moe": "thinker.audio_tower.proj2"}
AUDIO_FRAMES = 64  # log-mel frames of the hand-made audio clip (one window: 8 audio tokens in Qwen3-Omni)


def with_published_audio_windows(model):
    """transformers' Qwen3-Omni audio length formula assumes the published 100-frame windows (n_window 50) whatever
    the config says; the tiny config's smaller window is set to the published one for the audio forwards."""
    for name, tower in model.named_modules():  # thinker.audio_tower here, model.audio_tower in transformers' class
        if name.endswith("audio_tower") and hasattr(tower, "n_window_infer"):
            tower.n_window, tower.n_window_infer = 50, 100
    return model


def audio_batch(adapter, model) -> dict:
    """A prompt around an audio clip (random log-mel features), built by hand: calibration takes no audio (the
    adapter refuses it, and the tiny test inputs carry none), but the thinker's forward reads it, so the float checks
    can cover the audio tower's writer. The token count is what the audio tower makes of the clip."""
    thinker = with_published_audio_windows(model).thinker
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, thinker.config.audio_config.num_mel_bins, AUDIO_FRAMES, generator=generator)
    mask = torch.ones(1, AUDIO_FRAMES, dtype=torch.long)
    with torch.no_grad():
        count = thinker.get_audio_features(features, feature_attention_mask=mask).pooler_output.shape[0]
    tokenizer = adapter.processor.tokenizer
    token = tokenizer.convert_tokens_to_ids
    text = tokenizer("What is said?")["input_ids"]
    ids = torch.tensor([[token(tokenizer.audio_bos_token), *[token(tokenizer.audio_token)] * count,
                         token(tokenizer.audio_eos_token), *text]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": features,
            "feature_attention_mask": mask}


def rotated_thinker(family: str, path: Path, images: list[Path], structure_edit=None):
    """(the original float model, the quarot-rotated one, {medium: input}) on an image+prompt, a prompt alone, the
    calibVideos clips (frames) and a hand-made audio clip."""
    original = with_published_audio_windows(adapter_of(family, path).init_model(CPU, load_layers=True))
    adapter = adapter_of(family, path)
    if structure_edit is not None:
        adapter.structure = replace(adapter.structure, rotation=structure_edit(adapter.structure.rotation))
    data = image_samples(images[:1]) + ["a prompt without an image"] + video_samples()
    model, batches = transformed(adapter, [{"type": "quarot"}], data)
    inputs = {"image": batches[0], "text": batches[1], "video": batches[2], "video+image": batches[3],
              "audio": audio_batch(adapter, original)}
    return original, with_published_audio_windows(model), inputs


def logit_change(model, original, batch) -> tuple[float, float]:
    """max |Δlogit| and max |Δlogit| / max |logit|."""
    got, want = logits(model, batch), logits(original, batch)
    delta = (got - want).abs().max().item()
    return delta, delta / want.abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_is_exact_in_float_on_every_medium_and_rotates_only_the_towers_writers(omnis, images, family):
    original, model, inputs = rotated_thinker(family, omnis[family], images)
    assert inputs["audio"]["input_features"] is not None and "pixel_values_videos" in inputs["video"]
    for medium, batch in inputs.items():
        delta, relative = logit_change(model, original, batch)
        print(f"{family} quarot on {medium}: max |Δlogit| {delta:.2e} (/ max |logit| {relative:.2e})")
        assert delta < FLOAT_BOUND and relative < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert f"{TEXT}.0.self_attn.q_proj.weight" in changed and "thinker.model.embed_tokens.weight" in changed
    writers = {f"{w}.{p}" for w in (*VISION_WRITERS[family], AUDIO_WRITER[family]) for p in ("weight", "bias")}
    assert {k for k in changed if k.startswith(("thinker.visual.", "thinker.audio_tower."))} == writers

    # the audio writer's rows are rotated by the residual stream's Q (read off the embedding table, E·Q): W -> Qᵀ·W
    embedding = before["thinker.model.embed_tokens.weight"].double()
    q = torch.linalg.lstsq(embedding, after["thinker.model.embed_tokens.weight"].double()).solution
    assert (q.T @ q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max() < 1e-5  # orthogonal: a rotation
    for part in ("weight", "bias"):
        name = f"{AUDIO_WRITER[family]}.{part}"
        want = q.T @ before[name].double() if part == "weight" else before[name].double() @ q
        assert (after[name].double() - want).abs().max() < 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forgotten", ["vision", "audio"])
def test_quarot_must_rotate_each_towers_writer(omnis, images, family, forgotten):
    """A tower's output is scattered into the rotated residual stream: leaving its writer unrotated breaks the
    model on inputs that carry that medium, and only there."""
    def without(rotation):
        kept = [w for w in rotation.outside_writers if ("audio_tower" in w) == (forgotten == "vision")]
        return replace(rotation, outside_writers=tuple(kept))

    original, model, inputs = rotated_thinker(family, omnis[family], images, without)
    broken = {"vision": ("image", "video", "video+image"), "audio": ("audio",)}[forgotten]
    for medium, batch in inputs.items():
        delta, relative = logit_change(model, original, batch)
        print(f"{family} quarot without the {forgotten} writer, on {medium}: max |Δlogit| {delta:.2e}")
        assert (relative > 1e-2) if medium in broken else (relative < FLOAT_BOUND), medium


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_written_and_read_back_is_exact_on_every_medium(tmp_path, omnis, images, family):
    """quarot alone, written layer_wise (the vision tower read when its turn comes, the audio tower held from the
    start): both readers give the float thinker's logits on image, video, audio and text inputs; of the towers only
    the writers into the residual stream changed."""
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    source, out = omnis[family], tmp_path / "out"
    write_ascendv1(adapter_of(family, source), [{"type": "quarot"}], [], out, layer_wise=True)
    source_tensors, written = stored(source), stored(out)
    towers = [n for n in source_tensors if n.startswith(("thinker.visual.", "thinker.audio_tower."))]
    writers = {f"{w}.{p}" for w in (*VISION_WRITERS[family], AUDIO_WRITER[family]) for p in ("weight", "bias")}
    assert {n for n in towers if written[n] != source_tensors[n]} == writers
    adapter = adapter_of(family, source)
    original = with_published_audio_windows(adapter.init_model(CPU, load_layers=True))
    batches = adapter.handle_dataset(image_samples(images[:1]) + ["a prompt without an image"] + video_samples(1), CPU)
    batches.append(audio_batch(adapter, original))
    for reader in (load_ascendv1, load_reference_model):
        model = with_published_audio_windows(reader(out).eval())
        for batch in batches:
            delta, relative = logit_change(model, original, batch)
            medium = "audio" if "input_features" in batch else sorted(k for k in batch if "pixel" in k) or "text"
            print(f"{family} quarot written, read by {reader.__name__}, on {medium}: max |Δlogit| {delta:.2e}")
            assert delta < FLOAT_BOUND and relative < FLOAT_BOUND


# ---- output ------------------------------------------------------------------------------------------------------
UPSTREAM_EXCLUDES = ["*audio_tower*", "*lm_head", "*merger*", "*mlp.gate"]
PROCESS = [{"type": "iter_smooth"},
           {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*self_attn*"], "exclude": UPSTREAM_EXCLUDES},
           {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*mlp*", "*visual.blocks*"],
            "exclude": UPSTREAM_EXCLUDES}]
# Relative logit error (‖Δ‖/‖logits‖) of the W8A8 model read back on image+prompt inputs vs the float thinker;
# a wrong layout or scale gives ~1
READ_BACK_BOUND = 0.1
READER_AGREEMENT = 2e-3  # max |Δlogit| / max |logit| between our reader and the reference reader
PROCESSES = {"iter_smooth": PROCESS, "quarot+iter_smooth": [{"type": "quarot"}] + PROCESS}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("process", PROCESSES)
def test_w8a8_writes_the_same_bytes_both_ways_keeps_the_towers_and_reads_back(tmp_path, omnis, images, family,
                                                                             process):
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    source = omnis[family]
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(family, source), PROCESSES[process], image_samples(images) + video_samples(),
                              outs[runner], layer_wise=runner == "layer_wise")
    written = stored(outs["layer_wise"])
    assert written == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    fused = adapter_of(family, source).structure.fused_groups
    assert not [f for f in check_ascendv1(out, list(plan), fused) if f.level == "error"]
    expected = {f"{TEXT}.1.self_attn.q_proj": "W8A8", f"{TEXT}.2.self_attn.o_proj": "W8A8",
                "thinker.visual.blocks.0.attn.proj": "W8A8_DYNAMIC", "thinker.visual.merger.mlp.2": "FLOAT",
                "thinker.lm_head": "FLOAT"}
    if family == "qwen3_omni_moe":
        expected.update({f"{TEXT}.0.mlp.experts.2.up_proj": "W8A8_DYNAMIC", "thinker.visual.blocks.1.attn.qkv":
                         "W8A8_DYNAMIC", "thinker.visual.merger_list.0.mlp.2": "FLOAT"})
    else:  # the vision attention's q/k/v are fused by the engine: one scheme
        expected.update({f"{TEXT}.0.mlp.down_proj": "W8A8_DYNAMIC", "thinker.visual.blocks.1.attn.q": "W8A8_DYNAMIC",
                         "thinker.visual.blocks.1.attn.v": "W8A8_DYNAMIC"})
    assert {n: plan.get(n, "FLOAT") for n in expected} == expected
    description = json.loads((out / "quant_model_description.json").read_text())
    source_tensors = stored(source)
    for name in SPEECH[family]:  # talker and vocoder: written unchanged (bf16 as published), FLOAT
        assert written[name] == source_tensors[name] and description[name] == "FLOAT"
    rotated = {f"{w}.{p}" for w in (*VISION_WRITERS[family], AUDIO_WRITER[family]) for p in ("weight", "bias")
               if process.startswith("quarot")}  # the towers' writers into the residual stream: rows rotated, FLOAT
    untouched = [n for n in source_tensors  # tensors of both towers no rule quantized and quarot did not rotate
                 if n.startswith(("thinker.visual.", "thinker.audio_tower."))
                 and plan.get(n.rsplit(".", 1)[0], "FLOAT") == "FLOAT" and n not in rotated]
    assert any(n.startswith("thinker.audio_tower.") for n in untouched)
    assert all(written[n] == source_tensors[n] for n in untouched)  # byte for byte
    assert all(written[n] != source_tensors[n] and description[n] == "FLOAT" for n in rotated)

    float_model = transformers_thinker(family, source)
    # image and video probes: the static activation ranges come from images, videos and text, so an audio input
    # (never calibrated) is outside them; test_quarot_written_and_read_back_is_exact_on_every_medium covers audio
    probe = adapter_of(family, source).handle_dataset(image_samples(images[1:]) + video_samples(1), CPU)
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    for batch in probe:
        want, got, ref = logits(float_model, batch), logits(ours, batch), logits(reference, batch)
        error = ((got - want).norm() / want.norm()).item()
        agreement = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"{family} {process} W8A8 read back: relative logit error {error:.3f}; readers differ by {agreement:.1e}")
        assert error < READ_BACK_BOUND and agreement < READER_AGREEMENT


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_names_the_loaded_thinker_and_reads_back_as_ascendv1(tmp_path, omnis, images, family):
    """The thinker's tensors keep their published names (thinker.model.layers.*, thinker.visual.*); compressed-tensors
    targets name the modules of transformers' thinker class (model.language_model.*, model.visual.*). Our reader and
    `msmodelslim check` map one to the other: the output passes the checklist and reads back to exactly the layers
    the ascendv1 output of the same run gives."""
    import json

    source = omnis[family]
    process = [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"], "exclude": UPSTREAM_EXCLUDES}]
    data = image_samples(images)
    write_ascendv1(adapter_of(family, source), process, data, tmp_path / "ct", True, compressed_tensors=True)
    write_ascendv1(adapter_of(family, source), process, data, tmp_path / "ascendv1", True)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = {t for group in config["config_groups"].values() for t in group["targets"]}
    assert "model.language_model.layers.1.self_attn.q_proj" in targets and "model.visual.blocks.0.attn.proj" in targets
    assert f"{TEXT}.1.self_attn.q_proj.weight" in stored(tmp_path / "ct")
    probe = adapter_of(family, source).handle_dataset(image_samples(images[1:]), CPU)
    assert_our_readers_agree(tmp_path / "ct", tmp_path / "ascendv1", probe)
    # `msmodelslim convert` of the ascendv1 folder gives the same targets and the same layers
    from msmodelslim.cli.__main__ import main

    assert main(["convert", "--model_path", str(tmp_path / "ascendv1"), "--save_path", str(tmp_path / "converted")]) == 0
    converted = json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]
    assert {t for group in converted["config_groups"].values() for t in group["targets"]} == targets
    assert_our_readers_agree(tmp_path / "converted", tmp_path / "ascendv1", probe)


# ---- calibration media -------------------------------------------------------------------------------------------
def test_a_clip_of_identical_frames_is_the_image(omnis, images):
    """Qwen2-VL's image patches repeat one frame temporal_patch_size times: a video of that frame twice must give
    the same patches (the frame-directory video path is laid out as the image path, [C, T, p, p] per patch), and
    a frame padded to the temporal patch size (one frame) too."""
    from PIL import Image

    processor = adapter_of("qwen2_5_omni", omnis["qwen2_5_omni"]).processor
    frame = Image.open(images[1]).convert("RGB")
    image = processor.image_processor(images=[frame], return_tensors="np")
    for frames in ([frame, frame], [frame]):
        video = processor.video_processor([frames], return_tensors="np")
        assert (video["video_grid_thw"] == image["image_grid_thw"]).all()
        assert (video["pixel_values_videos"] == image["pixel_values"]).all()
    moving = processor.video_processor([[frame, frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] * 2],
                                       return_tensors="np")
    assert moving["video_grid_thw"].tolist() == [[2, *image["image_grid_thw"][0][1:].tolist()]]
    assert not (moving["pixel_values_videos"][: len(image["pixel_values"])] == image["pixel_values"]).all()


def test_calib_videos_is_the_projects_own_decoder_free_set():
    samples = load_vlm_samples("calibVideos", PROMPT, accepts=OmniThinkerAdapter.calibration_media,
                               model="qwen2_5_omni")
    assert len(samples) >= 6 and all(s.video.is_dir() for s in samples) and any(s.image for s in samples)
    assert (LAB_CALIB / "make_calib_videos.py").is_file()


def test_video_files_and_audio_are_refused_by_name_before_any_weight_is_read(tmp_path, monkeypatch):
    from msmodelslim.core import vlm_dataset

    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: False)  # as here: no torchvision, no decoder
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "index.jsonl").write_text(json.dumps({"video": "clip.mp4", "text": "What happens?"}) + "\n")
    with pytest.raises(UnsupportedError) as info:
        load_vlm_samples(str(tmp_path / "index.jsonl"), PROMPT, accepts=OmniThinkerAdapter.calibration_media,
                         model="qwen2_5_omni")
    message = str(info.value)
    assert "clip.mp4" in message and "video decoder" in message and "directory of numbered frames" in message
    (tmp_path / "speech.wav").write_bytes(b"RIFF")
    (tmp_path / "index.jsonl").write_text(json.dumps({"audio": "speech.wav", "text": "What is said?"}) + "\n")
    with pytest.raises(UnsupportedError, match="audio"):
        load_vlm_samples(str(tmp_path / "index.jsonl"), PROMPT, accepts=OmniThinkerAdapter.calibration_media,
                         model="qwen2_5_omni")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "cover.png").write_bytes(b"")
    (tmp_path / "index.jsonl").write_text(json.dumps({"video": "frames", "text": "What happens?"}) + "\n")
    with pytest.raises(InvalidDatasetError, match="no number"):
        load_vlm_samples(str(tmp_path / "index.jsonl"), PROMPT, accepts=OmniThinkerAdapter.calibration_media)


# ---- registry --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_model_types_are_registered_inferred_and_no_longer_planned(omnis, family):
    from msmodelslim.core.roadmap import PLANNED_MODEL_FAMILIES, planned_model_type

    names = {"qwen2_5_omni": ["Qwen2.5-Omni-7B"],
             "qwen3_omni_moe": ["Qwen3-Omni-30B-A3B-Thinking", "Qwen3-Omni-30B-A3B-Instruct"]}[family]
    cls = FAMILIES[family][1]
    assert all(registry.adapter_class(n) is cls for n in names) and cls.is_vlm
    assert not any(planned_model_type(n) for n in names)
    assert not {"qwen2_5_omni_thinker", "qwen3_omni_moe"} & set(PLANNED_MODEL_FAMILIES)
    assert registry.lookup(registry.infer_model_type(omnis[family])).target.endswith(cls.__name__)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_practice_runs_from_the_cli_on_calib_videos(omnis, tmp_path, family):
    """`--quant_type w8a8` resolves to the family's practice (upstream's recipe, calibrated on calibVideos: clips as
    frame directories and a still image); the thinker's text linears are W8A8_DYNAMIC, the towers, the head and the
    speech parts FLOAT, and the output passes the checker the CLI runs."""
    from msmodelslim.cli.__main__ import main

    name = FAMILIES[family][0]
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(omnis[family]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", name, "--quant_type", "w8a8"]) == 0
    practice = (out / f"{name}_best_practice.yaml").read_text()
    assert "dataset: calibVideos" in practice
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description[f"{TEXT}.1.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    mlp = f"{TEXT}.2.mlp.experts.3.down_proj" if family == "qwen3_omni_moe" else f"{TEXT}.2.mlp.down_proj"
    assert description[f"{mlp}.weight"] == "W8A8_DYNAMIC"
    for floating in ("thinker.lm_head.weight", "thinker.visual.blocks.0.attn.proj.weight",
                     "thinker.audio_tower.layers.0.fc1.weight", *SPEECH[family]):
        assert description[floating] == "FLOAT", floating
    if family == "qwen3_omni_moe":  # `msmodelslim eval` scores it against the float thinker on held-out images
        import math

        from msmodelslim.app.evaluate_vlm import evaluate_vlm

        report = evaluate_vlm(omnis[family], out, None, CPU, max_samples=2, max_new_tokens=4)
        print(report.table())
        assert report.float.kl == 0.0 and report.float.top1 == 1.0
        assert math.isfinite(report.quantized.kl) and report.quantized.kl > 0


def test_a_static_recipe_calibrates_on_calib_videos_through_the_cli(omnis, tmp_path, capfd):
    """A static W8A8 config (activation ranges come from the data) on calibVideos: the app loads the clips, runs
    them through the thinker and writes input scales; `check` passes on the output."""
    import yaml

    from msmodelslim.cli.__main__ import main

    config = {"apiversion": "multimodal_vlm_modelslim_v1",
              "spec": {"process": [{"type": "iter_smooth"},
                                   {"type": "linear_quant", "qconfig": W8A8_STATIC, "include": ["*"],
                                    "exclude": UPSTREAM_EXCLUDES}],
                       "save": [{"type": "ascendv1_saver", "part_file_size": 4}], "dataset": "calibVideos"}}
    path = tmp_path / "omni_static.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(omnis["qwen2_5_omni"]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Qwen2.5-Omni-7B", "--config_path", str(path)]) == 0
    assert "calibration: 7 batches" in capfd.readouterr().err  # every clip of calibVideos (one with a still image)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description[f"{TEXT}.0.self_attn.q_proj.weight"] == "W8A8"
    assert f"{TEXT}.0.self_attn.q_proj.input_scale" in description
    assert main(["check", str(out)]) == 0
