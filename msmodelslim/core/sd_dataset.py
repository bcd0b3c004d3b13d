"""`spec.dataset` of `multimodal_sd_modelslim_v1`: the prompts (and conditioning image) the float pipeline samples
for calibration.

A short name of a `lab_calib/` folder (`wan2_2_t2v`, `wan2_2_ti2v`, `wan2_2_i2v`, as upstream's Wan2.2 recipes name
theirs), a folder holding one `index.jsonl` or `index.json`, or such a file: entries `{"text": ..., "image": ...}`,
`text` required and non-empty, `image` a path relative to the index file. The texts replace
`inference_config.prompt` (which must then be absent); an image becomes `inference_config.image`, for a family
that samples with one (Wan2.2-I2V-A14B: one image for every prompt, as the Wan repository's --image) and is refused
by name for the others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from msmodelslim.core.dataset import LAB_CALIB
from msmodelslim.core.errors import InvalidDatasetError, UnsupportedError

INDEX_FILES = ("index.jsonl", "index.json")


@dataclass(frozen=True)
class SdSample:
    text: str
    image: Optional[Path] = None


def resolve_sd_dataset(name: str, config_dir: Optional[Path] = None) -> Path:
    """The index file `name` refers to: a path (absolute, next to the config, or from the working directory) or a
    lab_calib/ folder; a folder must hold exactly one of index.jsonl / index.json."""
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else (
        ([config_dir / given] if config_dir else []) + [Path.cwd() / given, LAB_CALIB / given])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            found = [candidate / f for f in INDEX_FILES if (candidate / f).is_file()]
            if len(found) != 1:
                raise InvalidDatasetError(f"dataset {name!r}: {candidate} must hold exactly one of "
                                          f"{' / '.join(INDEX_FILES)} (found {len(found)})")
            return found[0]
    shipped = sorted(p.name for p in LAB_CALIB.iterdir() if p.is_dir() and any((p / f).is_file() for f in INDEX_FILES))
    raise InvalidDatasetError(f"dataset {name!r} not found (looked in: {', '.join(str(c) for c in candidates)}); "
                              f"built-in prompt sets: {', '.join(shipped)}")


def load_sd_dataset(name: str, config_dir: Optional[Path] = None) -> list[SdSample]:
    path = resolve_sd_dataset(name, config_dir)
    try:
        raw = path.read_text(encoding="utf-8")
        entries = ([json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(raw))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidDatasetError(f"{path} is not a readable JSON/JSONL prompt set: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise InvalidDatasetError(f"{path}: expected a non-empty list of {{\"text\": ...}} entries")
    samples = []
    for i, entry in enumerate(entries):
        text = entry.get("text") if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InvalidDatasetError(f"{path} entry {i}: needs a non-empty \"text\"")
        image = entry.get("image")
        if image is not None:
            image = (path.parent / str(image)).resolve()
            if not image.is_file():
                raise InvalidDatasetError(f"{path} entry {i}: image {entry['image']!r} is not a file next to it")
        samples.append(SdSample(text, image))
    return samples


def dataset_sampling(samples: list[SdSample], takes_image: bool, source: str) -> dict[str, Any]:
    """The inference_config keys the prompt set gives: `prompt`, and `image` for a family that takes one."""
    images = {s.image for s in samples}
    if images == {None}:
        return {"prompt": [s.text for s in samples]}
    if not takes_image:
        raise UnsupportedError(f"{source}: its entries have images: image-conditioned sampling is not supported by "
                               f"this family (Wan2.2-I2V-A14B samples with an image); give text-only entries")
    if len(images) > 1:
        raise UnsupportedError(f"{source}: its entries name {len(images)} different images (or some none); this "
                               f"version samples every prompt from one conditioning image (the Wan repository's "
                               f"--image): give each entry the same image")
    return {"prompt": [s.text for s in samples], "image": str(images.pop())}
