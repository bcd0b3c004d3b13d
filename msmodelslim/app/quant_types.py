"""`--quant_type` names: the grammar of the established tool and the built-in configs this version can run.

A quant_type whose recipe needs an algorithm that is not implemented yet is refused by name; it is never
replaced by a different recipe behind the user's back.
"""
from __future__ import annotations

import re

from msmodelslim.core.config import PracticeConfig, parse_config
from msmodelslim.core.errors import ConfigError, UnsupportedError

QUANT_TYPE_PATTERN = re.compile(r"^w(\d+)a(\d+)(c8|f4|f8)?(s)?$")
KNOWN_QUANT_TYPES = ("w4a4", "w4a8", "w4a4c8", "w4a4f8", "w4a8c8", "w8a16", "w8a8", "w8a8s", "w8a8c8", "w8a8f8",
                     "w4a4f4", "w16a16s", "w4a16")

# What each refused type needs (the established recipes): the user learns why and what to do instead.
_MISSING = {
    "w8a8": "its recipe smooths outliers with iter_smooth first",
    "w4a8": "its recipe uses flex_awq_ssz and SSZ weights",
    "w4a16": "a usable 4-bit weight-only recipe needs AWQ or GPTQ",
    "w4a4": "its recipe needs rotation (adapt_rotation) and AutoRound",
    "w8a8s": "sparse quantization", "w16a16s": "float_sparse",
}

_BUILTIN = {
    "w8a16": {
        "apiversion": "modelslim_v1",
        "metadata": {"config_id": "default-w8a16", "label": {"w_bit": 8, "a_bit": 16}},
        "spec": {
            "process": [{
                "type": "linear_quant",
                "qconfig": {"weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}},
                "include": ["*"],
                "exclude": ["*lm_head*"],
            }],
            "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        },
    },
}


def config_for_quant_type(quant_type: str) -> PracticeConfig:
    name = quant_type.strip().lower()
    if not QUANT_TYPE_PATTERN.match(name) or name not in KNOWN_QUANT_TYPES:
        raise ConfigError(f"--quant_type {quant_type!r} is not valid; known: {', '.join(KNOWN_QUANT_TYPES)}")
    if name in _BUILTIN:
        return parse_config(_BUILTIN[name], f"built-in {name} recipe")
    reason = _MISSING.get(name, "KV-cache / attention quantization" if name[-2:] in ("c8", "f4", "f8") else "")
    raise UnsupportedError(
        f"--quant_type {name} is not available yet ({reason}, which this version does not implement). "
        f"Available: {', '.join(_BUILTIN)}. For round-to-nearest {name.upper()} write a config with linear_quant "
        f"and pass it with --config_path (examples in docs/examples/)"
    )
