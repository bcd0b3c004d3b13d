"""Text datasets for calibration and evaluation.

A dataset is named by a path (absolute, relative to the config file, or relative to the working directory) or
by a short name of a file shipped in `msmodelslim/lab_calib/` (calibration) or, for evaluation only, also in
`msmodelslim/lab_eval/` (evaluation text is never calibration data). Accepted files:
  .jsonl  one JSON object per line with a `text` or `inputs_pretokenized` string field
  .json   a JSON list of strings
  .txt    plain text; paragraphs (separated by blank lines) become samples
"""
from __future__ import annotations

import json
from pathlib import Path

from msmodelslim.core.errors import InvalidDatasetError

LAB_CALIB = Path(__file__).resolve().parent.parent / "lab_calib"
LAB_EVAL = Path(__file__).resolve().parent.parent / "lab_eval"
CALIB_DIRS = (LAB_CALIB,)
EVAL_DIRS = (LAB_EVAL, LAB_CALIB)  # evaluating on calibration text is allowed (e.g. to compare); not the reverse
TEXT_FIELDS = ("inputs_pretokenized", "text")
SUFFIXES = (".jsonl", ".json", ".txt")


def builtin_datasets(dirs: tuple[Path, ...] = CALIB_DIRS) -> list[str]:
    """Names of the shipped data files in `dirs`, in that order (each directory sorted)."""
    return [p.name for d in dirs for p in sorted(d.iterdir()) if p.suffix in SUFFIXES]


def resolve_dataset(name: str, config_dir: Path | None = None, builtin_dirs: tuple[Path, ...] = CALIB_DIRS) -> Path:
    """The file a dataset name refers to: a path first, then a shipped file of `builtin_dirs`."""
    candidates = [Path(name)] if Path(name).is_absolute() else (
        ([config_dir / name] if config_dir else []) + [Path.cwd() / name] + [d / name for d in builtin_dirs]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InvalidDatasetError(
        f"dataset {name!r} not found (looked in: {', '.join(str(c) for c in candidates)}); "
        f"built-in names: {', '.join(builtin_datasets(builtin_dirs))}"
    )


def resolve_eval_dataset(name: str) -> Path:
    """An evaluation set: a path, or a shipped name of lab_eval/ (e.g. prose_eval.txt) or lab_calib/."""
    return resolve_dataset(name, builtin_dirs=EVAL_DIRS)


def read_texts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidDatasetError(f"{path}: not a UTF-8 text file") from None
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidDatasetError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            text = next((item[f] for f in TEXT_FIELDS if isinstance(item, dict) and isinstance(item.get(f), str)), None)
            if text is None:
                raise InvalidDatasetError(f"{path}:{number}: needs a string field {' or '.join(TEXT_FIELDS)}")
            texts.append(text)
    elif suffix == ".json":
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidDatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise InvalidDatasetError(f"{path}: a .json dataset must be a list of strings")
        texts = items
    elif suffix == ".txt":
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    else:
        raise InvalidDatasetError(f"{path}: unsupported dataset type {suffix or '(none)'}; use .jsonl, .json or .txt")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidDatasetError(f"{path}: contains no text samples")
    return texts


def load_texts(name: str, config_dir: Path | None = None) -> list[str]:
    return read_texts(resolve_dataset(name, config_dir))
