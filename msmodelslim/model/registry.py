"""Model type name -> adapter, from the shipped adapters.ini and from installed entry points.

Each registered name belongs to a *pedigree* (the adapters.ini key, e.g. `qwen2_5`): the folder of
`lab_practice/` whose best practices serve it.
"""
from __future__ import annotations

import configparser
import difflib
import importlib
import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.core.logging import get_logger

log = get_logger("model.registry")

ENTRY_POINT_GROUP = "msmodelslim.model_adapters"
_INI = Path(__file__).with_name("adapters.ini")


@dataclass(frozen=True)
class AdapterEntry:
    target: str  # "module:Class"
    pedigree: str


def registered_adapters(ini_path: Path = _INI) -> dict[str, AdapterEntry]:
    """{model type name: entry}; entry points of installed packages may add names (the shipped ones win)."""
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the case of keys
    parser.read(ini_path, encoding="utf-8")
    table: dict[str, AdapterEntry] = {}
    for key, names in parser["ModelAdapter"].items():
        target = parser["ModelAdapterEntryPoints"][key]
        for name in (n.strip() for n in names.replace("\n", " ").split(",")):
            if name:
                table[name] = AdapterEntry(target, key)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # A third-party model's practices live under its own name unless its adapter says otherwise.
        table.setdefault(ep.name, AdapterEntry(ep.value, ep.name.lower()))
    return table


def lookup(model_type: str, table: dict[str, AdapterEntry] | None = None) -> AdapterEntry:
    table = registered_adapters() if table is None else table
    if model_type not in table:
        close = difflib.get_close_matches(model_type, list(table), n=5, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"registered: {', '.join(sorted(table))}"
        raise ConfigError(f"unknown --model_type {model_type!r} ({hint}); names are case-sensitive")
    return table[model_type]


def adapter_class(model_type: str, table: dict[str, AdapterEntry] | None = None):
    entry = lookup(model_type, table)
    module_name, _, class_name = entry.target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidModelError(f"adapter {entry.target!r} for {model_type!r} cannot be imported: {exc}") from None


def create_adapter(model_type: str, model_path: str, trust_remote_code: bool):
    return adapter_class(model_type)(model_type, model_path, trust_remote_code)


# ---- --model_type inferred from config.json ---------------------------------------------------------------
def hf_families(table: dict[str, AdapterEntry] | None = None) -> dict[str, list[str]]:
    """{config.json model_type: registered names whose adapter accepts it}, names in adapters.ini order.
    An adapter that cannot be imported (a broken third-party package) is skipped: it cannot serve anyway."""
    table = registered_adapters() if table is None else table
    families: dict[str, list[str]] = {}
    for name in table:
        try:
            hf_types = adapter_class(name, table).structure.hf_model_types
        except (InvalidModelError, AttributeError):
            log.debug("adapter of %s not importable; not considered for --model_type inference", name)
            continue
        for hf_type in hf_types:
            families.setdefault(hf_type, []).append(name)
    return families


def _read_config_json(model_path: Path) -> dict:
    """config.json as plain JSON: no transformers, no code from the checkpoint."""
    config_file = Path(model_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{model_path} has no config.json, so the model type cannot be inferred; point "
                                f"--model_path at a Hugging Face model directory, or pass --model_type") from None
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{config_file} is not readable JSON ({exc}); fix it, or pass --model_type") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{config_file} is not a JSON object; fix it, or pass --model_type")
    return config


def _pick_name(names: list[str], hints: list[str]) -> tuple[str, str]:
    """(name, why): a name equal to a hint, else the longest name a hint contains, else the first (ini order).
    Hints are where a model's own name usually survives: config.json's _name_or_path and the directory name."""
    lowered = [h.lower() for h in hints if h]
    for name in names:
        if name.lower() in lowered:
            return name, "it is the model's own name"
    contained = [n for n in names if any(n.lower() in h for h in lowered)]
    if contained:
        name = max(contained, key=len)  # Qwen2-7B-Instruct over Qwen2-7B for "Qwen2-7B-Instruct-sft"
        return name, f"the model's name {next(h for h in hints if name.lower() in h.lower())!r} contains it"
    return names[0], "the first registered name of that family; none matched the model's name"


def infer_model_type(model_path: Path, table: dict[str, AdapterEntry] | None = None) -> str:
    """The registered name for a checkpoint given without --model_type, from config.json's model_type."""
    table = registered_adapters() if table is None else table
    config = _read_config_json(model_path)
    hf_type = config.get("model_type")
    families = hf_families(table)
    if not isinstance(hf_type, str) or hf_type not in families:
        raise ConfigError(
            f"--model_type not given and {Path(model_path) / 'config.json'} has model_type {hf_type!r}, which no "
            f"registered adapter serves (supported: {', '.join(sorted(families))}); pass --model_type with a "
            f"registered name ('msmodelslim practices' lists them)"
        )
    name_or_path = config.get("_name_or_path")
    hints = [Path(name_or_path).name if isinstance(name_or_path, str) else "", Path(model_path).resolve().name]
    name, why = _pick_name(families[hf_type], hints)
    log.info("--model_type not given: using %s for config.json model_type %r: %s. Pass --model_type to choose "
             "another of the %d names of that family", name, hf_type, why, len(families[hf_type]))
    return name
