"""The winning practice of `msmodelslim tune`: the custom practice repository ($MSMODELSLIM_CUSTOM_PRACTICE_REPO)
checked before the run, and the chosen practice saved there under the adapter's pedigree so that
`quant --quant_type` finds it (app/practice.py)."""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from msmodelslim.app.practice import CUSTOM_REPO_ENV, PracticeLabel, load_practice_file
from msmodelslim.app.tune_history import write_yaml_atomically
from msmodelslim.app.tune_strategies import linear_quant_steps
from msmodelslim.core.dataset import LAB_CALIB, resolve_dataset
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")


@dataclass(frozen=True)
class TunedOrigin:
    """What a saved practice records of the tune run that chose it."""

    model_type: str
    pedigree: str  # the adapter's practice directory
    strategy_type: str
    dataset: str  # the template's calibration set, as the plan names it
    plan_dir: Path
    split_note: str = ""  # how the calibration set was split for the built-in evaluation, if it was


def check_practice_repo() -> Optional[Path]:
    repo = os.environ.get(CUSTOM_REPO_ENV)
    if not repo:
        log.info("%s is not set: the winning practice is kept in history/best.yaml only", CUSTOM_REPO_ENV)
        return None
    root = Path(repo)
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{CUSTOM_REPO_ENV}={repo}: {existing} is not a writable directory (tune saves the "
                          f"winning practice there)")
    return root



def _bits(qconfig: Optional[dict]) -> Optional[int]:
    if not qconfig:
        return 16
    match = re.search(r"(\d+)", str(qconfig.get("dtype", "")))
    return int(match.group(1)) if match else None


def practice_label(practice: dict) -> Optional[dict]:
    """The template's label, or one read off its first linear_quant step (int8 weights -> w_bit 8, no act -> 16)."""
    label = practice.get("metadata", {}).get("label")
    if label:
        return PracticeLabel.model_validate(label).model_dump()
    steps = linear_quant_steps(practice["spec"]["process"])
    if not steps:
        return None
    w_bit, a_bit = _bits(steps[0]["qconfig"].get("weight")), _bits(steps[0]["qconfig"].get("act"))
    return {"w_bit": w_bit, "a_bit": a_bit} if w_bit and a_bit else None


def portable_dataset(dataset: str, plan_dir: Path) -> str:
    """The template's calibration set as the saved practice must name it: a shipped name stays a name, a file of
    the user's becomes an absolute path (the practice no longer sits next to the plan)."""
    path = resolve_dataset(dataset, plan_dir)
    return dataset if path.parent == LAB_CALIB else str(path.resolve())


def save_practice(origin: TunedOrigin, repo: Path, practice: dict, chosen: dict) -> Optional[Path]:
    """Write the chosen practice into the custom repository under the adapter's pedigree, readable by
    `quant --quant_type` (checked by loading it back the way app/practice.py does)."""
    label = practice_label(practice)
    if label is None:
        log.warning("tune: the chosen practice has no metadata.label and none can be read off its linear_quant "
                    "steps; not saved into %s (add metadata.label to the template)", CUSTOM_REPO_ENV)
        return None
    template_meta = practice.get("metadata", {})
    base = str(template_meta.get("config_id", "")).rsplit("-iter", 1)[0] or origin.strategy_type
    config_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}-{origin.model_type}-tuned")
    saved = copy.deepcopy(practice)
    saved["spec"]["dataset"] = portable_dataset(origin.dataset, origin.plan_dir)  # not the split file inside this save_path
    note = f"msmodelslim tune ({origin.strategy_type}): {chosen['detail']}"
    if origin.split_note:
        note += f"; {origin.split_note}"
    saved["metadata"] = {"config_id": config_id, "score": float(template_meta.get("score", 100)), "label": label,
                         "verified_model_types": [origin.model_type], "description": note,
                         "verified": {origin.model_type: note}}
    directory = repo / origin.pedigree
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{config_id}.yaml"
    write_yaml_atomically(path, saved)
    load_practice_file(path)  # what `quant --quant_type` will read
    log.info("tune: saved the chosen practice as %s", path)
    return path
