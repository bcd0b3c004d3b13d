"""The best-practice library: `--quant_type` + `--model_type` -> a verified YAML config.

Practices live in `lab_practice/<pedigree>/<config_id>.yaml` (and, searched first, in
`$MSMODELSLIM_CUSTOM_PRACTICE_REPO/<pedigree>/`). Each carries `metadata`:

    metadata:
      config_id: qwen2_5-w8a8        # must equal the file name
      score: 90                      # higher wins when several match
      label: {w_bit: 8, a_bit: 8}    # which quant_type it serves (also kv_cache, fa_bit, is_sparse)
      model_types: ["*"]             # fnmatch patterns over --model_type names of the pedigree
      verified: {SmolLM2-135M-Instruct: "..."}   # what was measured, for people

No practice for the model -> `lab_practice/default/` for that quant_type, but only with the user's consent:
an interactive prompt, or `--allow_default_practice` (without a terminal the run stops and names the flag).
Models of the `default` pedigree (the generic adapter) have only those practices, so they are always asked.
"""
from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msmodelslim.core.config import PracticeConfig, load_config
from msmodelslim.core.errors import ConfigError, MsModelSlimError, UnsupportedError
from msmodelslim.core.logging import get_logger

log = get_logger("app.practice")
LAB_PRACTICE = Path(__file__).resolve().parent.parent / "lab_practice"
CUSTOM_REPO_ENV = "MSMODELSLIM_CUSTOM_PRACTICE_REPO"
DEFAULT_PEDIGREE = "default"
ALLOW_DEFAULT_FLAG = "--allow_default_practice"
QUANT_TYPE_PATTERN = re.compile(r"^w(\d+)a(\d+)(c8|f4|f8)?(s)?$")
KNOWN_QUANT_TYPES = ("w8a8", "w8a16", "w4a8", "w4a16", "w4a4", "w8a8s", "w16a16s", "w8a8c8", "w4a8c8", "w4a4c8",
                     "w8a8f8", "w4a4f8", "w4a4f4")

# Why a quant_type has no practice anywhere yet: the algorithms its recipe needs.
_MISSING = {
    "w4a8": "no dense W4A8 recipe has been measured yet (MoE families have one), and vLLM-Ascend loads "
            "W4A8 only for MoE experts; write a config with method ssz or gptq",
    "w4a4": "its recipe, LAOS (a rotation learned by adapt_rotation, then autoround_quant), is verified for Qwen3-32B "
            "only: lab_practice/qwen3/qwen3-w4a4.yaml; copy it into a config for another model",
}
# Reasons that are not a missing feature: the refusal does not say "not implemented".
_NOT_VERIFIED = ("w4a8", "w4a4")


class PracticeNeedsConsent(MsModelSlimError):
    """Only the default practice fits and the user has not agreed to it."""

    exit_code = 5


class PracticeLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    w_bit: int
    a_bit: int
    kv_cache: bool = False
    fa_bit: Optional[int] = None
    is_sparse: bool = False
    fa_quant: bool = Field(False, exclude=True)  # upstream spelling: FA quantization on, at 8 bits unless fa_bit

    @model_validator(mode="after")
    def _fa_quant_means_fa8(self) -> "PracticeLabel":
        if self.fa_quant and self.fa_bit is None:
            self.fa_bit = 8
        self.fa_quant = False  # folded into fa_bit, so labels compare by what they serve
        return self


class PracticeMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_id: str
    score: float = Field(100, ge=0)
    label: PracticeLabel
    model_types: list[str] = Field(default_factory=lambda: ["*"])
    verified: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    # The established tool's fields (protocol.md 3.2), so its practice files work in the custom repository:
    # a non-empty verified_model_types lists the models served; otherwise verified_tags {model: [[tag, ...]]}.
    verified_model_types: list[str] = Field(default_factory=list)
    verified_tags: dict[str, list[list[str]]] = Field(default_factory=dict)


@dataclass
class Practice:
    path: Path
    metadata: PracticeMetadata
    config: PracticeConfig

    def serves(self, model_type: str, tags: tuple[str, ...] = ()) -> bool:
        """Whether this practice serves the model; with `--tag`s, one verified scenario must hold them all."""
        meta = self.metadata
        if meta.verified_model_types:
            return model_type in meta.verified_model_types
        if meta.verified_tags:
            scenarios = meta.verified_tags.get(model_type)
            wanted = {t.lower() for t in tags}
            return scenarios is not None and (not wanted or any(wanted <= {t.lower() for t in s} for s in scenarios))
        return any(fnmatch.fnmatchcase(model_type, p) for p in meta.model_types)


def require_one_practice_source(*sources: object) -> None:
    """A run takes its practice from exactly one place: --quant_type, --config_path, or (the Python API) a parsed
    config; the text and the diffusion quantize check the same way."""
    if sum(source is not None for source in sources) != 1:
        raise ConfigError("give exactly one of --quant_type and --config_path")


def parse_quant_type(quant_type: str) -> PracticeLabel:
    name = quant_type.strip().lower()
    match = QUANT_TYPE_PATTERN.match(name)
    if not match or name not in KNOWN_QUANT_TYPES:
        raise ConfigError(f"--quant_type {quant_type!r} is not valid; known: {', '.join(KNOWN_QUANT_TYPES)}")
    w_bit, a_bit, extra, sparse = match.groups()
    return PracticeLabel(w_bit=int(w_bit), a_bit=int(a_bit), kv_cache=extra == "c8",
                         fa_bit=int(extra[1]) if extra in ("f4", "f8") else None, is_sparse=bool(sparse))


def load_practice_file(path: Path) -> Practice:
    config = load_config(path)
    try:
        metadata = PracticeMetadata.model_validate(config.metadata)
    except ValidationError as exc:
        lines = "; ".join(f"metadata.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid practice metadata: {lines}") from None
    if metadata.config_id != path.stem:
        raise ConfigError(f"{path}: metadata.config_id {metadata.config_id!r} must equal the file name {path.stem!r}")
    return Practice(path, metadata, config)


def practice_roots() -> list[Path]:
    custom = os.environ.get(CUSTOM_REPO_ENV)
    return ([Path(custom)] if custom else []) + [LAB_PRACTICE]


def _load_custom(path: Path) -> Optional[Practice]:
    """A practice from the user's repository; a broken one is skipped with a warning (it must not break every
    lookup), where a broken shipped practice is a bug and fails loudly."""
    try:
        return load_practice_file(path)
    except MsModelSlimError as exc:
        log.warning("skipping %s from %s: %s", path, CUSTOM_REPO_ENV, str(exc).replace("\n", " "))
        return None


def candidates(pedigree: str, label: PracticeLabel) -> list[Practice]:
    found = []
    for root in practice_roots():
        for path in sorted((root / pedigree).glob("*.yaml")):
            found.append(load_practice_file(path) if root == LAB_PRACTICE else _load_custom(path))
    matching = [p for p in found if p is not None and p.metadata.label == label]
    return sorted(matching, key=lambda p: (-p.metadata.score, p.metadata.config_id))


def find_practice(model_type: str, pedigree: str, label: PracticeLabel, tags: tuple[str, ...] = ()) -> Optional[Practice]:
    return next((p for p in candidates(pedigree, label) if p.serves(model_type, tags)), None)


def _ask(question: str) -> bool:
    answer = input(question)
    return answer.strip().lower() in ("y", "yes")


def select_practice(
    model_type: str, pedigree: str, quant_type: str, allow_default: bool = False,
    is_interactive: Callable[[], bool] = lambda: sys.stdin.isatty(), ask: Callable[[str], bool] = _ask,
    tags: tuple[str, ...] = (), vision_language: bool = False,
) -> Practice:
    """`vision_language`: the model is a VLM (its adapter's is_vlm), which the generic text practices never serve."""
    label = parse_quant_type(quant_type)
    name = quant_type.strip().lower()
    # The default pedigree's practices are generic, never verified on the model at hand: always asked for.
    chosen = find_practice(model_type, pedigree, label, tags) if pedigree != DEFAULT_PEDIGREE else None
    if chosen is not None:
        log.info("best practice: %s (score %g; serves %s for %s)", chosen.path, chosen.metadata.score,
                 model_type, name)
        return chosen
    if vision_language:
        served = [q for q in KNOWN_QUANT_TYPES if find_practice(model_type, pedigree, parse_quant_type(q), tags)]
        raise UnsupportedError(
            f"--quant_type {name} has no practice for the vision-language model {model_type} (its practices: "
            f"{', '.join(served) or 'none'}); the generic practices of lab_practice/default are for text models. "
            f"Write a multimodal_vlm_modelslim_v1 config (docs/vlm.md) and pass --config_path")
    fallback = find_practice(model_type, DEFAULT_PEDIGREE, label)
    if fallback is None:
        reason = _MISSING.get(name, "KV-cache / attention quantization" if name[-2:] in ("c8", "f4", "f8") else "")
        missing = "" if name in _NOT_VERIFIED else "; not implemented in this version"
        raise UnsupportedError(
            f"--quant_type {name} has no practice yet ({reason}{missing}). "
            f"Run 'msmodelslim practices' for what is available, or write a config and pass --config_path"
        )
    question = (f"No verified {name} practice for {model_type}. The generic one is {fallback.path}; "
                f"it has not been checked on this model.")
    if allow_default:
        log.warning("%s Using it because %s was given.", question, ALLOW_DEFAULT_FLAG)
        return fallback
    if not is_interactive():
        raise PracticeNeedsConsent(f"{question} Pass {ALLOW_DEFAULT_FLAG} to use it (no terminal to ask).")
    if ask(f"{question} Use it? [y/N] "):
        return fallback
    raise PracticeNeedsConsent(f"declined the default practice for {model_type} {name}; nothing was done")


def practice_table(names: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """[(model type, {quant_type: config_id | 'default (asks)'})] over `names` = {model type: pedigree}."""
    from msmodelslim.model.registry import adapter_class  # the adapter's is_vlm: no generic practice serves a VLM

    rows = []
    for model_type, pedigree in names.items():
        cells = {}
        try:
            vision_language = bool(getattr(adapter_class(model_type), "is_vlm", False))
        except MsModelSlimError:  # a name no adapter serves: only its practices' labels matter here
            vision_language = False
        for quant_type in KNOWN_QUANT_TYPES:
            label = parse_quant_type(quant_type)
            own = find_practice(model_type, pedigree, label) if pedigree != DEFAULT_PEDIGREE else None
            if own is not None:
                cells[quant_type] = own.metadata.config_id
            elif not vision_language and find_practice(model_type, DEFAULT_PEDIGREE, label) is not None:
                cells[quant_type] = "default (asks)"
        rows.append((model_type, cells))
    return rows
