"""Model type name -> adapter, from the shipped adapters.ini and from installed entry points.

Each registered name belongs to a *pedigree*: the folder of `lab_practice/` whose best practices serve it. It
is the name's adapters.ini key (e.g. `qwen2_5`) unless `[ModelPedigree]` gives the name its own (the
DeepSeek-R1-Distill-Qwen models run on the Qwen2 adapter but have practices of their own).

How a --model_type is resolved (`resolve`), everything decided from the name and config.json alone:

1. a registered name (exact spelling) -> its adapter; `default` is the generic adapter (model/default.py);
2. a name of a family the established tool serves with a pipeline this version lacks (vision-language,
   diffusion; core/roadmap.py) -> refused, naming what is missing;
3. any other name, with the checkpoint's config.json:
   - its model_type served by a registered adapter -> refused with that adapter's names: a typo or an
     unregistered variant, and the family's adapter (and practices) fit the model better than the generic one;
   - a vision/audio tower or a diffusers pipeline -> refused, naming the missing pipeline;
   - a decoder-only architecture transformers knows -> the `default` adapter, with a warning naming it;
   - otherwise -> refused, with the registered names of the requested name's family as hints.
"""
from __future__ import annotations

import argparse
import configparser
import difflib
import importlib
import json
import re
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.roadmap import DIFFUSION, MISSING_PIPELINE, PLANNED_MODEL_FAMILIES, VLM, planned_model_type

log = get_logger("model.registry")

ENTRY_POINT_GROUP = "msmodelslim.model_adapters"
DEFAULT_MODEL_TYPE = "default"  # the generic adapter: any decoder-only architecture transformers knows
_INI = Path(__file__).with_name("adapters.ini")
REGENERATE_DOCS = "python -m msmodelslim.model.registry --markdown docs/models.md"


@dataclass(frozen=True)
class AdapterEntry:
    target: str  # "module:Class"
    pedigree: str  # the lab_practice/ folder of the name's practices
    key: str = ""  # its adapters.ini key (an entry point's own name)


def registered_adapters(ini_path: Path = _INI, include_entry_points: bool = True) -> dict[str, AdapterEntry]:
    """{model type name: entry}; entry points of installed packages may add names (the shipped ones win)."""
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the case of keys
    parser.read(ini_path, encoding="utf-8")
    table: dict[str, AdapterEntry] = {}
    for key, names in parser["ModelAdapter"].items():
        target = parser["ModelAdapterEntryPoints"][key]
        for name in (n.strip() for n in names.replace("\n", " ").split(",")):
            if name:
                table[name] = AdapterEntry(target, key, key)
    pedigrees = parser["ModelPedigree"] if parser.has_section("ModelPedigree") else {}
    for name, pedigree in pedigrees.items():
        if name not in table:
            raise InvalidModelError(f"{ini_path}: [ModelPedigree] names {name!r}, which no adapter serves")
        table[name] = AdapterEntry(table[name].target, pedigree.strip(), table[name].key)
    if include_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            # A third-party model's practices live under its own name unless its adapter says otherwise.
            table.setdefault(ep.name, AdapterEntry(ep.value, ep.name.lower(), ep.name))
    return table


# ---- families of names, for hints --------------------------------------------------------------------------
_SIZE_AFTER_NUMBER = re.compile(r"[bmk](?![a-z])")  # 7B, 135M, 30B-A3B: a size, not a version


def name_family(name: str) -> tuple[str, Optional[str]]:
    """(brand, line) of a model name, lowercased. The brand is its leading letters (`qwen`, `glm`, `deepseek`);
    the line runs to its first version number (`qwen3`, `glm-5`, `deepseek-v3`, `llama-3`), None when the first
    number is a size (`QwQ-32B`) or there is none."""
    lowered = name.lower()
    letters = re.match(r"[a-z]+", lowered)
    brand = letters.group(0) if letters else lowered.split("-")[0]
    number = re.search(r"\d+", lowered)
    if number is None or _SIZE_AFTER_NUMBER.match(lowered, number.end()):
        return brand, None
    return brand, lowered[: number.end()]


def _closest(name: str, candidates: list[str], n: int = 6) -> list[str]:
    ratio = lambda c: difflib.SequenceMatcher(None, name.lower(), c.lower()).ratio()  # noqa: E731
    return sorted(candidates, key=lambda c: (-ratio(c), c))[:n]


def same_family(name: str, names: list[str]) -> tuple[str, list[str]]:
    """(the family as spelled in `name`, the registered names of that family, closest first). The line
    (`Qwen3`) is tried first, then the brand (`Qwen`); ([brand], []) when no registered name shares either."""
    brand, line = name_family(name)
    for key, part in ((line, 1), (brand, 0)):
        members = [n for n in names if key is not None and name_family(n)[part] == key]
        if members:
            return name[: len(key)], _closest(name, members)
    return name[: len(brand)], []


def registered_families(names: list[str]) -> list[str]:
    """The brands of the registered names, spelled as in the first name of each."""
    spelled: dict[str, str] = {}
    for n in names:
        if n != DEFAULT_MODEL_TYPE:
            brand = name_family(n)[0]
            spelled.setdefault(brand, n[: len(brand)])
    return sorted(spelled.values(), key=str.lower)


DEFAULT_HINT = (f"--model_type {DEFAULT_MODEL_TYPE} quantizes any decoder-only model whose architecture transformers "
                f"knows (structure inferred from the model, generic practices)")


def unknown_name_message(model_type: str, table: dict[str, AdapterEntry], served_by: Optional[list[str]] = None,
                         config_note: str = "") -> str:
    """The refusal of an unregistered name: same-family names, else the families there are; the names serving
    the checkpoint's config.json model_type when known (`served_by`); how to use the default adapter."""
    names = list(table)
    family, members = same_family(model_type, names)
    if members:
        message = f"unknown --model_type {model_type!r}; closest: {', '.join(members)} (the {family} family)"
    else:
        message = (f"unknown --model_type {model_type!r}: no registered name of the {family} family (registered "
                   f"families: {', '.join(registered_families(names))})")
    message += "; names are case-sensitive"
    if served_by:
        shown = _closest(model_type, served_by)
        more = f", ... ({len(served_by)} in all)" if len(served_by) > len(shown) else ""
        message += f". {config_note} is served by: {', '.join(shown)}{more}; pass one of them"
    elif config_note:
        message += f". {config_note}"
    return f"{message}. {DEFAULT_HINT}; 'msmodelslim practices' lists the registered names"


def lookup(model_type: str, table: dict[str, AdapterEntry] | None = None) -> AdapterEntry:
    """The entry of a registered name; a planned family's name is refused naming what is missing, any other
    name with same-family hints. `resolve` also consults the checkpoint (and may pick the default adapter)."""
    table = registered_adapters() if table is None else table
    if model_type in table:
        return table[model_type]
    planned = planned_model_type(model_type)
    if planned is not None:
        raise UnsupportedError(planned)
    raise ConfigError(unknown_name_message(model_type, table))


def adapter_class_of(entry: AdapterEntry, model_type: str):
    module_name, _, class_name = entry.target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidModelError(f"adapter {entry.target!r} for {model_type!r} cannot be imported: {exc}") from None


def adapter_class(model_type: str, table: dict[str, AdapterEntry] | None = None):
    return adapter_class_of(lookup(model_type, table), model_type)


def create_adapter(model_type: str, model_path: str, trust_remote_code: bool, entry: AdapterEntry | None = None):
    """The adapter for `model_type` (resolved against the checkpoint unless `entry` is given), its checkpoint opened
    as the source to quantize: a quantization_config the package cannot read is refused now, before any weight."""
    entry = resolve(model_type, Path(model_path)) if entry is None else entry
    adapter = adapter_class_of(entry, model_type)(model_type, model_path, trust_remote_code)
    open_source = getattr(adapter, "open_source", None)
    if open_source is not None:
        open_source()
    return adapter


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


def causal_lm_class_name(hf_type: object) -> Optional[str]:
    """The class AutoModelForCausalLM builds for a config.json model_type, if transformers ships one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_type) if isinstance(hf_type, str) else None


_MULTIMODAL_KEYS = ("vision_config", "audio_config", "visual", "vision_tower", "thinker_config")


def multimodal_refusal(config: dict, model_path: Path | None = None) -> Optional[str]:
    """What a checkpoint needs that this version lacks, when it is a vision-language (a vision or audio tower in
    config.json) or a diffusion model (a diffusers model_index.json); None for a text model."""
    where = f"{model_path}: " if model_path is not None else ""
    if model_path is not None and (Path(model_path) / "model_index.json").is_file():
        return f"{where}a diffusers pipeline (model_index.json): {MISSING_PIPELINE[DIFFUSION]}"
    towers = [k for k in _MULTIMODAL_KEYS if config.get(k)]
    if towers:
        return (f"{where}config.json (model_type {config.get('model_type')!r}) has {', '.join(towers)}: "
                f"{MISSING_PIPELINE[VLM]}")
    return None


def _config_if_any(model_path: Path) -> Optional[dict]:
    try:
        return _read_config_json(model_path)
    except InvalidModelError:
        return None


def resolve(model_type: str, model_path: Path | None = None,
            table: dict[str, AdapterEntry] | None = None) -> AdapterEntry:
    """The adapter entry for --model_type `model_type` and the checkpoint at `model_path` (the rule is in the
    module docstring). Only config.json is read, as plain JSON; nothing of the weights."""
    table = registered_adapters() if table is None else table
    if model_type in table:
        return table[model_type]
    planned = planned_model_type(model_type)
    if planned is not None:
        raise UnsupportedError(planned)
    config = _config_if_any(model_path) if model_path is not None else None
    if config is None:
        raise ConfigError(unknown_name_message(model_type, table))
    hf_type = config.get("model_type")
    note = f"{Path(model_path) / 'config.json'}'s model_type {hf_type!r}"
    served_by = hf_families(table).get(hf_type) if isinstance(hf_type, str) else None
    if served_by:
        raise ConfigError(unknown_name_message(model_type, table, served_by, note))
    refusal = multimodal_refusal(config, model_path)
    if refusal is not None:
        raise UnsupportedError(refusal)
    causal_lm = causal_lm_class_name(hf_type)
    if causal_lm is None or DEFAULT_MODEL_TYPE not in table:
        raise ConfigError(unknown_name_message(
            model_type, table, config_note=f"{note} is not a decoder-only architecture transformers knows"))
    log.warning("--model_type %r is not registered and no adapter serves %s (%s): using the default adapter, "
                "which infers the structure from the model (logged below) and uses the generic practices of "
                "lab_practice/default. Pass --model_type %s to say so and silence this warning",
                model_type, note, causal_lm, DEFAULT_MODEL_TYPE)
    return table[DEFAULT_MODEL_TYPE]


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
    """The registered name for a checkpoint given without --model_type, from config.json's model_type. A type
    no adapter serves is refused (never the generic adapter unasked); the message says when `default` works."""
    table = registered_adapters() if table is None else table
    config = _read_config_json(model_path)
    hf_type = config.get("model_type")
    families = hf_families(table)
    if not isinstance(hf_type, str) or hf_type not in families:
        refusal = multimodal_refusal(config, model_path)
        if refusal is not None:
            raise UnsupportedError(refusal)
        generic = (f", or --model_type {DEFAULT_MODEL_TYPE} for the generic adapter ({causal_lm_class_name(hf_type)} "
                   f"is an architecture transformers knows)" if causal_lm_class_name(hf_type) else "")
        raise ConfigError(
            f"--model_type not given and {Path(model_path) / 'config.json'} has model_type {hf_type!r}, which no "
            f"registered adapter serves (supported: {', '.join(sorted(families))}); pass --model_type with a "
            f"registered name ('msmodelslim practices' lists them){generic}"
        )
    name_or_path = config.get("_name_or_path")
    hints = [Path(name_or_path).name if isinstance(name_or_path, str) else "", Path(model_path).resolve().name]
    name, why = _pick_name(families[hf_type], hints)
    log.info("--model_type not given: using %s for config.json model_type %r: %s. Pass --model_type to choose "
             "another of the %d names of that family", name, hf_type, why, len(families[hf_type]))
    return name


# ---- the documentation's table ------------------------------------------------------------------------------
def architecture_of(entry: AdapterEntry, model_type: str) -> str:
    """The config.json model_type(s) the name's adapter accepts, as the docs show them."""
    hf_types = getattr(adapter_class_of(entry, model_type).structure, "hf_model_types", ())
    return ", ".join(f"`{t}`" for t in hf_types) if hf_types else "any decoder-only (AutoModelForCausalLM)"


def markdown_tables(table: dict[str, AdapterEntry] | None = None) -> str:
    """The registered names (name -> adapter key -> pedigree -> architecture), then the planned families'
    names: the section of docs/models.md that tests/test_model_names.py keeps equal to the registry."""
    table = registered_adapters(include_entry_points=False) if table is None else table
    lines = ["| `--model_type` | adapter key | pedigree (`lab_practice/`) | architecture (config.json `model_type`) |",
             "|---|---|---|---|"]
    for name, entry in table.items():
        lines.append(f"| `{name}` | {entry.key} | {entry.pedigree} | {architecture_of(entry, name)} |")
    lines += ["", "Not supported yet (refused by name before anything is read):", "",
              "| `--model_type` | established tool's adapter key | what is missing |", "|---|---|---|"]
    for key, (work, names) in PLANNED_MODEL_FAMILIES.items():
        lines.append(f"| {', '.join(f'`{n}`' for n in names)} | {key} | {MISSING_PIPELINE[work]} |")
    return "\n".join(lines) + "\n"


DOCS_BEGIN = f"<!-- generated from msmodelslim/model/adapters.ini; regenerate: {REGENERATE_DOCS} -->"
DOCS_END = "<!-- end of the generated tables -->"


def docs_section(text: str) -> Optional[str]:
    """The generated part of a docs file (between the markers), None when the markers are missing."""
    start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    return text[start + len(DOCS_BEGIN) : end].strip("\n") + "\n" if 0 <= start < end else None


def write_docs_section(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if docs_section(text) is None:
        raise SystemExit(f"{path} lacks the markers {DOCS_BEGIN!r} ... {DOCS_END!r}")
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    path.write_text(f"{head}{DOCS_BEGIN}\n{markdown_tables()}{DOCS_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msmodelslim.model.registry",
                                     description="Print or update the docs table of registered model names.")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE", required=True,
                        help="print the tables (no FILE), or rewrite the generated section of FILE")
    args = parser.parse_args(argv)
    if args.markdown == "-":
        sys.stdout.write(markdown_tables())
    else:
        write_docs_section(Path(args.markdown))
        print(f"updated {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
