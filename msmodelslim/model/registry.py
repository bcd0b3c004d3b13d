"""Model type name -> adapter, from the shipped adapters.ini and from installed entry points.

Each registered name belongs to a *pedigree* (the adapters.ini key, e.g. `qwen2_5`): the folder of
`lab_practice/` whose best practices serve it.
"""
from __future__ import annotations

import configparser
import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from msmodelslim.core.errors import ConfigError, InvalidModelError

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
