"""Names of the established protocol that this version does not implement yet, each with the piece of work it
belongs to. One table, so that every refusal of a recipe that needs one of them says "not implemented yet" and
what is missing, instead of looking like a typo; a name leaves this table when its feature lands."""
from __future__ import annotations

from typing import Optional

FLOAT_FORMATS = "the floating-point formats (FP8, MXFP8, MXFP4) work"
KV_ATTENTION = "the attention and KV-cache quantization work"
VLM = "the vision-language model work"
DIFFUSION = "the diffusion transformer work"
# online_quarot exists for the attention of diffusion transformers (multimodal_sd_modelslim_v1) only
ONLINE_ROTATION_TEXT = ("the online rotations of text models; for now it runs on diffusion transformers' attention, "
                        "apiversion multimodal_sd_modelslim_v1")

NOT_YET: dict[str, dict[str, str]] = {
    "processor": {
        "online_quarot": ONLINE_ROTATION_TEXT,
    },
    "dtype": {"hifloat8": FLOAT_FORMATS},
    "saver": {},  # every saver of the established protocol is served
    "apiversion": {},  # every apiversion of the established protocol is served
}


# What a model family needs that this version lacks, as the user reads it in a refusal.
MISSING_PIPELINE = {
    VLM: "vision-language models are not supported yet (issue: VLM pipeline)",
    DIFFUSION: ("this diffusion family is not supported yet (issue: diffusion pipeline; Wan2.1, Wan2.2-T2V-A14B, "
                "Wan2.2-TI2V-5B, Wan2.2-I2V-A14B, FLUX.1-dev, Qwen-Image-Edit-2509 and HunyuanVideo are)"),
}

# --model_type names of the established tool (protocol.md 5.1) whose families need a pipeline this version lacks:
# {its adapter key there: (the work it belongs to, its names)}. They are refused by name before anything is read,
# so that asking for one says what is missing instead of "unknown model type".
PLANNED_MODEL_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
}
PLANNED_MODEL_TYPES: dict[str, tuple[str, str]] = {  # {lowercased name: (adapter key there, work)}
    name.lower(): (key, work) for key, (work, names) in PLANNED_MODEL_FAMILIES.items() for name in names
}


def planned_model_type(name: object) -> Optional[str]:
    """Why --model_type `name` cannot run yet, for a name of a planned family (any case), else None."""
    planned = PLANNED_MODEL_TYPES.get(name.lower()) if isinstance(name, str) else None
    if planned is None:
        return None
    key, work = planned
    return (f"--model_type {name!r} is served by the established tool's {key} adapter: {MISSING_PIPELINE[work]}; "
            f"it belongs to {work}. Nothing was read")


def not_yet(kind: str, name: object) -> Optional[str]:
    """'<kind> <name> is not implemented yet (it belongs to ...)' for a planned name, else None."""
    work = NOT_YET.get(kind, {}).get(name) if isinstance(name, str) else None
    return f"{kind} {name!r} is not implemented yet (it belongs to {work})" if work else None
