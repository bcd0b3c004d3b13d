"""The reading side of `apiversion: modelslim_v0` (core/v0.py): one upstream keyword-argument mapping checked
against its signature and read with its defaults, and the note each mapped key leaves."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from msmodelslim.core.errors import ConfigError

# Keys the established service sets itself: a file that sets them fails upstream with "got multiple values".
SET_BY_SERVICE = {"dev_type": "the device comes from --device", "model": "the model comes from --model_path",
                  "calib_data": "calibration data comes from calib_dataset", "cfg": "it is built from calib_cfg",
                  "output_path": "the output goes to --save_path", "json_name": "the description file name is fixed",
                  "save_type": "the output format is ascendV1"}
GLOB = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class Note:
    """What one v0 key became, e.g. `v0 anti_cfg.anti_method m4 -> iter_smooth`."""

    key: str
    text: str
    warning: bool = False  # the key is ignored, or means a little less than upstream: logged as a warning

    def __str__(self) -> str:
        return f"v0 {self.key} {self.text}"


@dataclass
class Translation:
    """A v0 file as a modelslim_v1 document, with one note per mapped key."""

    document: dict
    notes: list[Note]

    def to_yaml(self) -> str:
        """The document as YAML (leaf lists and mappings inline), valid input for --config_path."""
        return yaml.safe_dump(self.document, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120)

    def log(self, logger: logging.Logger) -> None:
        for note in self.notes:
            (logger.warning if note.warning else logger.info)("%s", note)


class V0Section:
    """One v0 keyword-argument mapping, checked against the upstream signature (`defaults`) and read with its
    defaults; every error names the key by its path in the file."""

    def __init__(self, path: str, data: Any, defaults: dict[str, Any], takes: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must be a mapping of {takes} arguments, not {type(data).__name__}")
        for key in data:
            if key in SET_BY_SERVICE:
                raise ConfigError(f"{path}.{key}: not allowed in a modelslim_v0 file ({SET_BY_SERVICE[key]})")
            if key not in defaults:
                raise ConfigError(f"{path}.{key}: unknown modelslim_v0 key ({takes} takes {', '.join(defaults)})")
        self.path, self.data, self.defaults = path, data, defaults

    def given(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        value = self.data.get(key)
        return self.defaults[key] if value is None else value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path}.{key}: expected true or false, got {value!r}")
        return value

    def whole(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}.{key}: expected a whole number, got {value!r}")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.path}.{key}: expected a number, got {value!r}")
        return float(value)

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path}.{key}: expected a string, got {value!r}")
        return value

    def names(self, key: str) -> list[str]:
        """Exact module names (upstream rejects a name the model lacks, so a wildcard never worked there)."""
        value = self.raw(key) or []
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise ConfigError(f"{self.path}.{key}: expected a list of module names")
        for name in value:
            if GLOB.search(name) or "{" in name or "}" in name:
                raise ConfigError(f"{self.path}.{key}: {name!r} is not a module name; modelslim_v0 takes exact names "
                                  f"here (write patterns in calib_params.mix_cfg, or in a modelslim_v1 config)")
        return list(dict.fromkeys(value))

    def ignored(self, key: str, why: str, notes: Optional[list[Note]]) -> None:
        """A key set to a non-default value that has no effect in this recipe (as upstream): a warning note."""
        if notes is not None and self.given(key) and self.data[key] != self.defaults[key]:
            notes.append(Note(f"{self.path.removeprefix('spec.')}.{key}", f"{self.data[key]!r} ignored: {why}", True))


def add_note(notes: Optional[list[Note]], key: str, text: str) -> None:
    if notes is not None:
        notes.append(Note(key, text))
