"""Calibration samples of vision-language models (apiversion multimodal_vlm_modelslim_v1).

A sample pairs a prompt with the media it is about; the adapter's processor (chat template, image processor)
turns each into one model input. Paths are absolute and known to exist once a sample is built.

`spec.dataset` names, in this order (protocol.md 2.7; the established tool's one-command guide):
  1. an `index.json` / `index.jsonl` file, or a directory holding exactly one of them: entries
     `{"text": ..., "image": ..., "audio": ..., "video": ...}`, every field optional but one medium or a text, the
     media paths relative to the index file, `text` falling back to `spec.default_text`. A `video` is a directory
     of numbered frames (`frame_000.png`, `frame_001.png`, ...: .png/.jpg/.jpeg, in the order of their numbers),
     which needs no decoder: the frames go to the model's processor as a list (model/vlm_omni.py). A container
     file (.mp4, ...) is read only where a video decoder is installed, and refused before any weight is read
     otherwise, naming the decoder and the frame-directory alternative;
  2. a directory of images only (.jpg/.jpeg/.png), each calibrated with `spec.default_text`;
  3. a directory of images plus exactly one other `.json` / `.jsonl` of `{"image": ..., "text": ...}` entries
     (a JSON array, or one object per line), the images relative to that directory.
A name is looked up as a path (absolute, then relative to the config file, then to the working directory), then as
a built-in set of `msmodelslim/lab_calib/` (`calibImages`, `calibVideos`). Every image and video frame is decoded
when the set is loaded, so a broken file is named before any weight is read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Optional, Sequence, Union

from msmodelslim.core.dataset import LAB_CALIB
from msmodelslim.core.errors import InvalidDatasetError, UnsupportedError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUDIO_SUFFIXES = (".wav", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")  # containers: need a decoder (see missing_decoders)
MAX_FRAMES = 256  # frames of one frame-directory video
INDEX_NAMES = ("index.json", "index.jsonl")
MEDIA = ("image", "audio", "video")  # what an index entry may carry besides its text
MAX_SAMPLES = 100_000  # far beyond any calibration set; stops a runaway index before every image is decoded
MAX_LISTED = 10  # problems named in one error

# Built-in sets of the established tool that this version cannot ship: {name: why}.
NOT_SHIPPED: dict[str, str] = {}


@dataclass(frozen=True)
class VlmCalibSample:
    text: str
    image: Optional[Path] = None
    audio: Optional[Path] = None
    video: Optional[Path] = None


CalibrationData = Union[list[str], list[VlmCalibSample]]  # a text run's texts, or a VLM run's samples


# ---- what can be decoded ---------------------------------------------------------------------------------------
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_decoders(kind: str) -> Optional[str]:
    """What transformers' processors lack in this environment to read `kind` ("video" or "audio"), or None.

    Video: transformers' video processors need torchvision, and load_video a decoder (PyAV, decord, OpenCV or
    torchcodec). Audio: load_audio decodes with soundfile and resamples with soxr (or uses torchaudio). None of
    these is a dependency of msmodelslim; a user who installs them gets the media through."""
    if kind == "video":
        lacking = [] if _installed("torchvision") else ["torchvision (transformers' video processors)"]
        if not any(_installed(m) for m in ("av", "decord", "cv2", "torchcodec")):
            lacking.append("a video decoder (av, decord, opencv-python or torchcodec)")
        return " and ".join(lacking) or None
    if _installed("torchaudio") or (_installed("soundfile") and _installed("soxr")):
        return None
    return "an audio decoder (soundfile with soxr, or torchaudio)"


# ---- reading a set ---------------------------------------------------------------------------------------------
def _check_image(path: Path) -> Optional[str]:
    """Why `path` is not a usable image, or None. Decodes it fully: a truncated file fails here, not mid-run."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums (PNG CRCs)
        with Image.open(path) as image:
            image.load()  # every pixel: catches truncated data verify() does not read
            if image.width < 1 or image.height < 1:
                return "it has no pixels"
    except Image.DecompressionBombError as exc:
        return f"it is too large to decode safely ({exc})"
    except Exception as exc:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"not a readable image ({type(exc).__name__}: {exc})"
    return None


def _media_path(base: Path, value: Any, field: str, suffixes: tuple[str, ...], where: str) -> Optional[Path]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidDatasetError(f"{where}: {field!r} must be a path (a non-empty string), got {value!r}")
    path = (base / value).resolve()
    if path.suffix.lower() not in suffixes:
        raise InvalidDatasetError(f"{where}: {field} {value!r} must end in {', '.join(suffixes)}")
    if not path.is_file():
        raise InvalidDatasetError(f"{where}: {field} file {value!r} not found (looked for {path})")
    return path


def video_frames(directory: Path) -> list[Path]:
    """The frames of a frame-directory video in playing order: every non-hidden file is a .png/.jpg/.jpeg image
    whose name holds a number (the last one in the name orders them)."""
    import re

    files = sorted(p for p in directory.iterdir() if not _is_hidden(p))
    others = [p.name for p in files if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
    unnumbered = [p.name for p in files if p.name not in others and not re.search(r"\d+", p.stem)]
    if others or unnumbered or not files:
        why = (f"it also holds {', '.join(others[:MAX_LISTED])}" if others else
               f"frame(s) {', '.join(unnumbered[:MAX_LISTED])} have no number in their name" if unnumbered else
               "it is empty")
        raise InvalidDatasetError(f"video {directory} is not a frame directory: {why}. A video is a directory of "
                                  f"numbered frames (frame_000.png, frame_001.png, ...)")
    if len(files) > MAX_FRAMES:
        raise InvalidDatasetError(f"video {directory} holds {len(files)} frames; at most {MAX_FRAMES}")
    return sorted(files, key=lambda p: (int(re.findall(r"\d+", p.stem)[-1]), p.name))


def _video_path(base: Path, value: Any, where: str) -> Optional[Path]:
    """A `video` field: a directory of numbered frames, or a container file (refused later without a decoder)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidDatasetError(f"{where}: 'video' must be a path (a non-empty string), got {value!r}")
    path = (base / value).resolve()
    if path.is_dir():
        video_frames(path)  # named now: a bad frame directory fails before any weight is read
        return path
    return _media_path(base, value, "video", VIDEO_SUFFIXES, where)


def _entries(path: Path) -> list[tuple[str, Any]]:
    """[(where, entry)] of a .json (an array, or one object) or .jsonl (one JSON value per line) file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidDatasetError(f"{path}: not a UTF-8 text file") from None
    if path.suffix.lower() == ".jsonl":
        out = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InvalidDatasetError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        return out
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidDatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    items = value if isinstance(value, list) else [value]
    return [(f"{path} entry {i}", item) for i, item in enumerate(items)]


def _text_of(entry: dict, default_text: str, where: str, required: bool) -> str:
    text = entry.get("text")
    if text is None and not required:
        return default_text
    if not isinstance(text, str) or not text.strip():
        raise InvalidDatasetError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    return text


def _read_index(index: Path, default_text: str, accepts: Collection[str] = MEDIA,
                model: str = "the model") -> list[VlmCalibSample]:
    """Form 1: an index of text/image/audio/video entries, media relative to the index file; a medium the model
    does not take (`accepts`), then one this environment cannot decode, is refused by the entry."""
    samples = []
    base = index.parent
    for where, entry in _entries(index):
        if not isinstance(entry, dict):
            raise InvalidDatasetError(f"{where}: each entry must be an object with text/image/audio/video fields")
        unknown = sorted(set(entry) - {"text", "image", "audio", "video"})
        if unknown:
            raise InvalidDatasetError(f"{where}: unknown field(s) {', '.join(unknown)}; an index entry has text, "
                                      f"image, audio and video")
        sample = VlmCalibSample(
            text=_text_of(entry, default_text, where, required=False),
            image=_media_path(base, entry.get("image"), "image", IMAGE_SUFFIXES, where),
            audio=_media_path(base, entry.get("audio"), "audio", AUDIO_SUFFIXES, where),
            video=_video_path(base, entry.get("video"), where),
        )
        _refuse_media_the_model_lacks(sample, where, accepts, model)
        _refuse_undecodable(sample, where)
        samples.append(sample)
    return samples


def _read_pairs(directory: Path, listing: Path) -> list[VlmCalibSample]:
    """Form 3: {image, text} entries, images relative to the directory (text required: it is the point)."""
    samples = []
    for where, entry in _entries(listing):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InvalidDatasetError(f"{where}: each entry must be an object {{\"image\": <path>, \"text\": "
                                      f"<prompt>}}, got {str(entry)[:80]}")
        unknown = sorted(set(entry) - {"image", "text"})
        if unknown:
            raise InvalidDatasetError(f"{where}: unknown field(s) {', '.join(unknown)}; entries have image and text "
                                      f"(audio and video go in an index.jsonl)")
        samples.append(VlmCalibSample(_text_of(entry, "", where, required=True),
                                      _media_path(directory, entry["image"], "image", IMAGE_SUFFIXES, where)))
    return samples


def _refuse_media_the_model_lacks(sample: VlmCalibSample, where: str, accepts: Collection[str], model: str) -> None:
    for kind in MEDIA:
        path = getattr(sample, kind)
        if path is not None and kind not in accepts:
            takes = " and ".join(m + "s" for m in MEDIA if m in accepts) or "no media"
            raise UnsupportedError(
                f"{where}: the sample's {kind} {path.name} cannot be calibrated on: {model} calibration takes "
                f"{takes} with text only ({kind} input is not supported yet for it). Remove the {kind} field from the "
                f"index, or calibrate on calibImages")


def _refuse_undecodable(sample: VlmCalibSample, where: str) -> None:
    for kind, path in (("video", sample.video), ("audio", sample.audio)):
        missing = missing_decoders(kind) if path is not None and not path.is_dir() else None
        if missing and kind == "video":
            raise UnsupportedError(
                f"{where}: the sample's video {path.name} is a container file, and reading it needs {missing}, "
                f"which msmodelslim does not depend on and this environment lacks. Give the video as a directory "
                f"of numbered frames instead (frame_000.png, frame_001.png, ...: e.g. `ffmpeg -i {path.name} "
                f"-vf fps=2 {path.stem}/frame_%03d.png`), or install the decoder")
        if missing:
            raise UnsupportedError(
                f"{where}: the sample's {kind} {path.name} cannot be calibrated on: reading {kind} needs {missing}, "
                f"which msmodelslim does not depend on and this environment lacks. Install it, or calibrate on "
                f"images and text (remove the {kind} field)")


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _read_directory(directory: Path, default_text: str, accepts: Collection[str] = MEDIA,
                    model: str = "the model") -> list[VlmCalibSample]:
    files = sorted(p for p in directory.iterdir() if not _is_hidden(p))
    indexes = [p for p in files if p.name in INDEX_NAMES]
    if len(indexes) > 1:
        raise InvalidDatasetError(f"{directory} holds both index.json and index.jsonl; keep one")
    if indexes:
        return _read_index(indexes[0], default_text, accepts, model)
    images = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    listings = [p for p in files if p.is_file() and p.suffix.lower() in (".json", ".jsonl")]
    others = [p for p in files if p not in images and p not in listings]
    if others or len(listings) > 1 or not (images or listings):
        found = (f"{len(images)} image(s), {len(listings)} .json/.jsonl file(s)"
                 + (f", and {', '.join(p.name + ('/' if p.is_dir() else '') for p in others[:MAX_LISTED])}"
                    if others else ""))
        raise InvalidDatasetError(
            f"{directory} is not an image dataset: it holds {found}. A VLM dataset is an index.json/index.jsonl (or "
            f"a directory with one), a directory of .jpg/.jpeg/.png images only, or images plus exactly one "
            f".json/.jsonl of {{image, text}} entries")
    if listings:
        return _read_pairs(directory, listings[0])
    return [VlmCalibSample(default_text, image.resolve()) for image in images]


def _candidates(name: str, source_dir: Optional[Path]) -> list[Path]:
    path = Path(name).expanduser()
    if path.is_absolute():
        return [path]
    return ([source_dir / path] if source_dir else []) + [Path.cwd() / path, LAB_CALIB / path]


def builtin_image_sets() -> list[str]:
    return sorted(p.name for p in LAB_CALIB.iterdir() if p.is_dir() and not _is_hidden(p))


def load_vlm_samples(dataset: str, default_text: str, source_dir: Optional[Path] = None,
                     accepts: Collection[str] = MEDIA, model: str = "the model") -> list[VlmCalibSample]:
    """The calibration samples `dataset` names (see the module docstring), every image checked by decoding it.
    `accepts`: the media the model's calibration takes (its adapter's `calibration_media`), `model` its name in
    the refusal of any other medium; both are checked here, before any weight is read."""
    if not default_text.strip():
        raise InvalidDatasetError("default_text must be a non-empty prompt")
    candidates = _candidates(dataset, source_dir)
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        if dataset in NOT_SHIPPED:
            raise UnsupportedError(f"dataset {dataset!r} is not shipped with this version: {NOT_SHIPPED[dataset]} "
                                   f"(video needs {missing_decoders('video') or 'nothing more here'}; audio needs "
                                   f"{missing_decoders('audio') or 'nothing more here'}). Use calibImages or an "
                                   f"index.jsonl of your own images")
        raise InvalidDatasetError(f"dataset {dataset!r} not found (looked in: {', '.join(map(str, candidates))}); "
                                  f"built-in image sets: {', '.join(builtin_image_sets())}")
    found = found.resolve()
    if found.is_dir():
        samples = _read_directory(found, default_text, accepts, model)
    elif found.name in INDEX_NAMES:
        samples = _read_index(found, default_text, accepts, model)
    else:
        raise InvalidDatasetError(
            f"dataset {dataset!r} is the file {found}; a VLM dataset is an index.json/index.jsonl, or a directory of "
            f"images (with at most one .json/.jsonl of {{image, text}} entries). A text set such as "
            f"{found.name} calibrates text models (apiversion modelslim_v1)")
    if not samples:
        raise InvalidDatasetError(f"dataset {dataset!r} ({found}) holds no samples")
    if len(samples) > MAX_SAMPLES:
        raise InvalidDatasetError(f"dataset {dataset!r} holds {len(samples)} samples; at most {MAX_SAMPLES}")
    _refuse_unreadable_images(samples)
    return samples


def _refuse_unreadable_images(samples: Sequence[VlmCalibSample]) -> None:
    problems = []
    frames = [f for s in samples if s.video is not None and s.video.is_dir() for f in video_frames(s.video)]
    for image in dict.fromkeys([s.image for s in samples if s.image is not None] + frames):  # each file once
        why = _check_image(image)
        if why:
            problems.append(f"{image}: {why}")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InvalidDatasetError(f"{len(problems)} calibration image(s) cannot be used (fix or remove them):\n  "
                                  + "\n  ".join(problems[:MAX_LISTED]) + more)


# ---- what identifies a set -------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _media_digest(path: Path) -> str:
    """A file's sha256; a frame directory's: its frames' names and digests, in playing order."""
    if not path.is_dir():
        return _file_digest(path)
    listing = [[frame.name, _file_digest(frame)] for frame in video_frames(path)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def calibration_digest(data: Iterable[Union[str, VlmCalibSample]]) -> str:
    """sha256 of the calibration data: the texts as JSON (a text run), or per sample its text and the content of
    its media files (a VLM run: a replaced image with the same name changes the digest)."""
    items = list(data)
    if all(isinstance(item, str) for item in items):
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()
    described = [[item.text] + [_media_digest(path) if path is not None else None
                                for path in (item.image, item.audio, item.video)] for item in items]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()
