"""Model type name -> adapter class, from the shipped adapters.ini and from installed entry points."""
from __future__ import annotations

import configparser
import difflib
import importlib
from importlib.metadata import entry_points
from pathlib import Path

from msmodelslim.core.errors import ConfigError, InvalidModelError

ENTRY_POINT_GROUP = "msmodelslim.model_adapters"
_INI = Path(__file__).with_name("adapters.ini")


def registered_adapters(ini_path: Path = _INI) -> dict[str, str]:
    """{model type name: "module:Class"}; entry points of installed packages come after (and may add names)."""
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the case of keys
    parser.read(ini_path, encoding="utf-8")
    table: dict[str, str] = {}
    for key, names in parser["ModelAdapter"].items():
        target = parser["ModelAdapterEntryPoints"][key]
        for name in (n.strip() for n in names.replace("\n", " ").split(",")):
            if name:
                table[name] = target
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.value)
    return table


def adapter_class(model_type: str, table: dict[str, str] | None = None):
    table = registered_adapters() if table is None else table
    if model_type not in table:
        close = difflib.get_close_matches(model_type, list(table), n=5, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"registered: {', '.join(sorted(table))}"
        raise ConfigError(f"unknown --model_type {model_type!r} ({hint}); names are case-sensitive")
    module_name, _, class_name = table[model_type].partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidModelError(f"adapter {table[model_type]!r} for {model_type!r} cannot be imported: {exc}") from None


def create_adapter(model_type: str, model_path: str, trust_remote_code: bool):
    return adapter_class(model_type)(model_type, model_path, trust_remote_code)
