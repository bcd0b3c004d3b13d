"""VLM calibration data (core/vlm_dataset.py): the dataset forms in protocol.md 2.7's order, every image decoded at
load time (one error naming each broken file), video/audio refused by name where nothing can decode them, the
built-in calibImages set, and the data digest the resume fingerprint uses."""
import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from msmodelslim.core import vlm_dataset
from msmodelslim.core.dataset import LAB_CALIB
from msmodelslim.core.errors import InvalidDatasetError, UnsupportedError
from msmodelslim.core.vlm_dataset import (VlmCalibSample, builtin_image_sets, calibration_digest, load_vlm_samples,
                                          missing_decoders)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "Describe this image in detail."


def image(path: Path, seed: int = 0, size=(24, 16)) -> Path:
    rng = random.Random(seed)
    picture = Image.new("RGB", size)
    picture.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def lines(path: Path, entries: list) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


# ---- form 1: index.json / index.jsonl ----------------------------------------------------------------------------
def test_index_jsonl_file_resolves_media_relative_to_it_and_falls_back_to_default_text(tmp_path):
    image(tmp_path / "img" / "a.png")
    image(tmp_path / "img" / "b.jpg", 1)
    index = lines(tmp_path / "index.jsonl", [{"image": "img/a.png", "text": "What is this?"}, {"image": "img/b.jpg"},
                                             {"text": "Text only: say hello."}])
    samples = load_vlm_samples(str(index), DEFAULT)
    assert samples == [VlmCalibSample("What is this?", (tmp_path / "img" / "a.png").resolve()),
                       VlmCalibSample(DEFAULT, (tmp_path / "img" / "b.jpg").resolve()),
                       VlmCalibSample("Text only: say hello.")]
    assert all(s.image is None or (s.image.is_absolute() and s.image.is_file()) for s in samples)


def test_index_json_array_and_a_directory_holding_one_index(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "index.json").write_text(json.dumps([{"image": "a.png", "text": "Count the colours."}]))
    image(tmp_path / "unlisted.png", 3)  # the index decides what is calibrated on, not the directory listing
    expected = [VlmCalibSample("Count the colours.", (tmp_path / "a.png").resolve())]
    assert load_vlm_samples(str(tmp_path), DEFAULT) == expected


def test_a_directory_with_both_index_files_is_refused(tmp_path):
    image(tmp_path / "a.png")
    lines(tmp_path / "index.jsonl", [{"image": "a.png"}])
    (tmp_path / "index.json").write_text("[]")
    with pytest.raises(InvalidDatasetError, match="both index.json and index.jsonl"):
        load_vlm_samples(str(tmp_path), DEFAULT)


@pytest.mark.parametrize("entry,needle", [
    ({"image": "missing.png"}, "image file 'missing.png' not found"),
    ({"image": "a.gif"}, "must end in .jpg, .jpeg, .png"),
    ({"image": "a.png", "caption": "x"}, "unknown field(s) caption"),
    ({"image": "a.png", "text": ""}, "'text' must be a non-empty string"),
    ({"image": 3}, "must be a path"),
    ({"audio": "sound.ogg"}, "must end in .wav, .mp3"),
    ("just a string", "each entry must be an object"),
])
def test_bad_index_entries_name_the_line_and_the_problem(tmp_path, entry, needle):
    image(tmp_path / "a.png")
    index = lines(tmp_path / "index.jsonl", [{"image": "a.png"}, entry])
    with pytest.raises(InvalidDatasetError) as info:
        load_vlm_samples(str(index), DEFAULT)
    assert f"{index}:2" in str(info.value) and needle in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    index = tmp_path / "index.jsonl"
    index.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InvalidDatasetError, match=r"index.jsonl:2: invalid JSON"):
        load_vlm_samples(str(index), DEFAULT)


# ---- forms 2 and 3: image directories ----------------------------------------------------------------------------
def test_a_directory_of_images_only_pairs_each_with_default_text(tmp_path):
    for i, name in enumerate(["b.jpeg", "a.PNG", "c.jpg"]):
        image(tmp_path / name, i)
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden files are not part of a set
    samples = load_vlm_samples(str(tmp_path), "Summarize the picture.")
    assert [s.image.name for s in samples] == ["a.PNG", "b.jpeg", "c.jpg"]
    assert {s.text for s in samples} == {"Summarize the picture."}


@pytest.mark.parametrize("listing", ["pairs.jsonl", "pairs.json"])
def test_images_with_one_listing_of_image_text_pairs(tmp_path, listing):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png", 1)
    entries = [{"image": "b.png", "text": "Second?"}, {"image": str((tmp_path / "a.png").resolve()), "text": "First?"}]
    if listing.endswith(".jsonl"):
        lines(tmp_path / listing, entries)
    else:
        (tmp_path / listing).write_text(json.dumps(entries))
    samples = load_vlm_samples(str(tmp_path), DEFAULT)
    assert [(s.image.name, s.text) for s in samples] == [("b.png", "Second?"), ("a.png", "First?")]


def test_pairs_need_their_text_and_no_other_fields(tmp_path):
    image(tmp_path / "a.png")
    lines(tmp_path / "pairs.jsonl", [{"image": "a.png"}])
    with pytest.raises(InvalidDatasetError, match="'text' must be a non-empty string"):
        load_vlm_samples(str(tmp_path), DEFAULT)
    lines(tmp_path / "pairs.jsonl", [{"image": "a.png", "text": "t", "video": "v.mp4"}])
    with pytest.raises(InvalidDatasetError, match="audio and video go in an index.jsonl"):
        load_vlm_samples(str(tmp_path), DEFAULT)


@pytest.mark.parametrize("extra,needle", [
    (["notes.txt"], "1 image(s), 0 .json/.jsonl file(s), and notes.txt"),
    (["a.jsonl", "b.json"], "1 image(s), 2 .json/.jsonl file(s)"),
    (["sub/"], "and sub/"),
])
def test_a_directory_that_is_no_form_says_what_it_holds(tmp_path, extra, needle):
    image(tmp_path / "a.png")
    for name in extra:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("[]")
    with pytest.raises(InvalidDatasetError) as info:
        load_vlm_samples(str(tmp_path), DEFAULT)
    assert needle in str(info.value) and "is not an image dataset" in str(info.value)


def test_empty_directory_text_dataset_and_missing_name_are_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidDatasetError, match="holds 0 image"):
        load_vlm_samples("empty", DEFAULT)
    with pytest.raises(InvalidDatasetError, match="calibrates text models"):
        load_vlm_samples("mix_calib.jsonl", DEFAULT)  # the text default of modelslim_v1, found in lab_calib
    with pytest.raises(InvalidDatasetError) as info:
        load_vlm_samples("no_such_images", DEFAULT)
    assert "not found" in str(info.value) and "built-in image sets: calibImages" in str(info.value)


def test_a_relative_name_is_found_next_to_the_config_first(tmp_path, monkeypatch):
    config_dir, elsewhere = tmp_path / "configs", tmp_path / "cwd"
    image(config_dir / "imgs" / "x.png")
    image(elsewhere / "imgs" / "y.png", 1)
    monkeypatch.chdir(elsewhere)
    assert load_vlm_samples("imgs", DEFAULT, config_dir)[0].image.name == "x.png"
    assert load_vlm_samples("imgs", DEFAULT)[0].image.name == "y.png"


# ---- every image decoded at load time ----------------------------------------------------------------------------
def test_broken_images_are_named_in_one_error(tmp_path):
    image(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a picture")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidDatasetError) as info:
        load_vlm_samples(str(tmp_path), DEFAULT)
    message = str(info.value)
    assert message.startswith("2 calibration image(s) cannot be used")
    for name in ("garbage.png", "truncated.png"):
        assert str((tmp_path / name).resolve()) in message
    assert "good.png" not in message


def test_an_image_is_decoded_once_however_many_samples_use_it(tmp_path, monkeypatch):
    image(tmp_path / "a.png")
    lines(tmp_path / "index.jsonl", [{"image": "a.png", "text": f"question {i}"} for i in range(5)])
    checked = []
    monkeypatch.setattr(vlm_dataset, "_check_image", lambda path: checked.append(path))
    assert len(load_vlm_samples(str(tmp_path), DEFAULT)) == 5
    assert checked == [(tmp_path / "a.png").resolve()]


# ---- video and audio ---------------------------------------------------------------------------------------------
def _media_set(tmp_path: Path) -> Path:
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    (tmp_path / "voice.wav").write_bytes(b"\0" * 16)
    return lines(tmp_path / "index.jsonl", [{"text": "What happens?", "video": "clip.mp4"},
                                            {"text": "Who speaks?", "audio": "voice.wav"}])


def test_video_and_audio_are_refused_by_name_when_nothing_can_decode_them(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: False)
    index = _media_set(tmp_path)
    with pytest.raises(UnsupportedError) as info:
        load_vlm_samples(str(index), DEFAULT)
    message = str(info.value)
    assert f"{index}:1" in message and "clip.mp4" in message and "torchvision" in message and "video decoder" in message
    lines(index, [{"text": "Who speaks?", "audio": "voice.wav"}])
    with pytest.raises(UnsupportedError, match="soundfile with soxr, or torchaudio"):
        load_vlm_samples(str(index), DEFAULT)


def test_video_and_audio_pass_through_where_decoders_are_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: True)
    samples = load_vlm_samples(str(_media_set(tmp_path)), DEFAULT)
    assert samples[0].video == (tmp_path / "clip.mp4").resolve()
    assert samples[1].audio == (tmp_path / "voice.wav").resolve()


def test_what_this_environment_lacks_follows_the_installed_packages(monkeypatch):
    present = {"torchvision", "av"}
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: module in present)
    assert missing_decoders("video") is None
    assert missing_decoders("audio") == "an audio decoder (soundfile with soxr, or torchaudio)"
    present.clear()
    assert missing_decoders("video").startswith("torchvision")


def test_media_the_model_does_not_take_are_refused_by_name_before_the_decoders_are_asked(tmp_path, monkeypatch):
    """Where the decoders are installed a Qwen-VL run still cannot use video or audio (its calibration takes images);
    where they are not, the model's refusal comes first (installing them would not help)."""
    image(tmp_path / "a.png")
    index = _media_set(tmp_path)
    lines(index, [{"text": "What is this?", "image": "a.png"}, {"text": "What happens?", "video": "clip.mp4"}])
    for installed in (True, False):
        monkeypatch.setattr(vlm_dataset, "_installed", lambda module, installed=installed: installed)
        with pytest.raises(UnsupportedError) as info:
            load_vlm_samples(str(index), DEFAULT, accepts=("image",), model="Qwen2.5-VL-7B-Instruct")
        message = str(info.value)
        assert f"{index}:2" in message and "clip.mp4" in message and "Qwen2.5-VL-7B-Instruct" in message
        assert "takes images with text only" in message and "torchvision" not in message
    lines(index, [{"text": "Who speaks?", "audio": "voice.wav"}])
    with pytest.raises(UnsupportedError, match="audio voice.wav cannot be calibrated on"):
        load_vlm_samples(str(index), DEFAULT, accepts=("image",), model="Qwen3-VL-4B-Instruct")
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: True)  # a model taking every medium: accepted
    assert load_vlm_samples(str(index), DEFAULT)[0].audio == (tmp_path / "voice.wav").resolve()


def test_quant_refuses_video_for_a_qwen_vl_model_before_any_weight_is_read(tmp_path, monkeypatch, capsys):
    """`msmodelslim quant` (and its dry run) on an index with a video entry, decoders installed: refused by the
    adapter's calibration_media when the set is loaded, before the skeleton's weights are read."""
    import yaml

    from msmodelslim.cli.__main__ import main
    from tiny_vlm import make_tiny_vlm

    model = make_tiny_vlm(tmp_path / "model", "qwen2_5_vl")
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: True)
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read before the refusal"))
    image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "clip.mp4").write_bytes(b"\0" * 16)
    lines(tmp_path / "data" / "index.jsonl", [{"image": "a.png"}, {"text": "What happens?", "video": "clip.mp4"}])
    config = tmp_path / "w8a8.yaml"
    process = [{"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
        "act": {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"},
        "weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}}]
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": process, "dataset": str(tmp_path / "data"), "save": [{"type": "ascendv1_saver"}]}}))
    for dry_run in ([], ["--dry_run"]):
        code = main(["quant", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--device", "cpu",
                     "--model_type", "Qwen2.5-VL-7B-Instruct", "--config_path", str(config), *dry_run])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err
        assert "clip.mp4" in err and "takes images with text only" in err and "not supported yet" in err, err
        assert not (tmp_path / "out").exists()


def test_calib_videos_is_a_set_of_frame_directories_that_needs_no_decoder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vlm_dataset, "_installed", lambda module: False)  # no torchvision, no video decoder
    samples = load_vlm_samples("calibVideos", DEFAULT)
    assert len(samples) >= 5 and all(s.video is not None and s.video.is_dir() for s in samples)
    assert all(len(vlm_dataset.video_frames(s.video)) >= 4 for s in samples)
    directory = LAB_CALIB / "calibVideos"
    assert sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) < 200 * 1024
    assert "calibVideos" in (LAB_CALIB / "README.md").read_text()


# ---- the built-in set --------------------------------------------------------------------------------------------
def test_calib_images_is_a_varied_decodable_set_of_the_projects_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in lab_calib, not in the working directory
    samples = load_vlm_samples("calibImages", DEFAULT)
    directory = LAB_CALIB / "calibImages"
    files = sorted(p for p in directory.iterdir() if p.suffix in (".png", ".jpg"))
    assert 16 <= len(samples) <= 24
    assert sorted(s.image for s in samples) == [p.resolve() for p in files]  # every image listed, once
    assert len({s.text for s in samples}) >= len(samples) - 2  # varied prompts
    assert sum(p.stat().st_size for p in directory.iterdir()) < 1.5 * 1024 * 1024
    assert {"calibImages", "calibVideos"} <= set(builtin_image_sets())
    readme = (LAB_CALIB / "README.md").read_text()
    assert "calibImages" in readme and "generated by this project" in readme


def test_the_generator_rewrites_the_shipped_index(tmp_path):
    from msmodelslim.lab_calib import make_calib_images

    written = make_calib_images.write(tmp_path)
    shipped = LAB_CALIB / "calibImages"
    assert (tmp_path / "index.jsonl").read_text() == (shipped / "index.jsonl").read_text()
    for path in written:
        with Image.open(path) as new, Image.open(shipped / path.name) as old:
            assert new.size == old.size and new.mode == old.mode


def test_the_package_data_ships_every_calibration_and_evaluation_file():
    """Every file under lab_calib/ and lab_eval/ (images, frame folders, prompt sets) matches a package-data glob
    of pyproject.toml, so that an installed wheel has them too."""
    import glob
    import tomllib

    package = REPO / "msmodelslim"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["msmodelslim"]
    shipped = {Path(f) for pattern in patterns for f in glob.glob(pattern, root_dir=package)}
    files = {f.relative_to(package) for folder in ("lab_calib", "lab_eval") for f in (package / folder).rglob("*")
             if f.is_file() and "__pycache__" not in f.parts}
    assert Path("lab_calib/calibImages") in {f.parent for f in files}
    assert Path("lab_calib/calibVideos") in {f.parent.parent for f in files}
    assert files - shipped == set()


# ---- what identifies a set (resume fingerprint) ------------------------------------------------------------------
def test_the_digest_of_texts_is_unchanged_and_samples_hash_image_content(tmp_path):
    texts = ["a", "b"]
    assert calibration_digest(texts) == hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    picture = image(tmp_path / "a.png")
    before = calibration_digest([VlmCalibSample("t", picture)])
    assert calibration_digest([VlmCalibSample("t", picture)]) == before
    assert calibration_digest([VlmCalibSample("u", picture)]) != before
    image(picture, seed=7)  # same name, other pixels
    assert calibration_digest([VlmCalibSample("t", picture)]) != before
    assert calibration_digest([]) == calibration_digest([])
