"""Check a MindIE-layout checkpoint (format/mindie.py) against what its writer promises: one description named
after its `model_quant_type`, weight files of the same stem, only the types the layout holds, and every tensor
check the ascendv1 layout shares with it (format/ascendv1/checker.py), deq_scale in float32 whatever the model's
dtype."""
from __future__ import annotations

import json
from pathlib import Path

from msmodelslim.format.ascendv1.checker import check_described_tensors, checked_output_config
from msmodelslim.format.ascendv1.reader import mindie_descriptions, quantized_layers
from msmodelslim.format.ascendv1.tensors import FLOAT
from msmodelslim.format.ascendv1.writer import DESCRIPTION as ASCENDV1_DESCRIPTION
from msmodelslim.format.findings import Finding
from msmodelslim.format.mindie import SUPPORTED, SUPPORTED_NAMES, file_names
from msmodelslim.model.checkpoint import read_json

WRITTEN_TAGS = {s.value for s in SUPPORTED}


def is_mindie(path: Path) -> bool:
    """A folder mindie_format_saver wrote: a `quant_model_description_<type>.json`, or (nothing quantized) a
    `quant_model_description.json` without ascendv1's `version` key."""
    if mindie_descriptions(path):
        return True
    plain = path / ASCENDV1_DESCRIPTION
    try:
        return plain.is_file() and "version" not in json.loads(plain.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_mindie(path: Path, expected_linears: list[str] | None = None,
                 fused_groups: tuple[tuple[str, ...], ...] = ()) -> list[Finding]:
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    found = mindie_descriptions(path) or [p for p in [path / ASCENDV1_DESCRIPTION] if p.is_file()]
    if len(found) != 1:
        err(f"expected one MindIE description (quant_model_description_<type>.json), found {len(found)}")
        return findings
    description = read_json(found[0])
    checked_output_config(path, err)
    recorded = description.get("model_quant_type")
    if not isinstance(recorded, str):
        err("description lacks 'model_quant_type'")
    else:
        name, stem = file_names(None if recorded == FLOAT else recorded)
        if found[0].name != name:
            err(f"{found[0].name}: the description of a {recorded} checkpoint is named {name}")
        strays = [p.name for p in path.glob("*.safetensors") if not p.name.startswith(stem)]
        if strays:
            err(f"weight file(s) {', '.join(sorted(strays)[:5])} do not carry the description's stem {stem}")
    for prefix, tag in sorted(quantized_layers(description).items()):
        if tag not in WRITTEN_TAGS:
            err(f"{prefix}: {tag} is not a type of the MindIE layout ({SUPPORTED_NAMES})")
    # bfloat16: the deq_scale MindIE reads is float32 whatever the model's dtype
    return findings + check_described_tensors(path, description, "bfloat16", expected_linears, fused_groups)
