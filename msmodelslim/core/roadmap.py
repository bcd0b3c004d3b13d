"""Names of the established protocol that this version does not implement yet, each with the piece of work it
belongs to. One table, so that every refusal of a recipe that needs one of them says "not implemented yet" and
what is missing, instead of looking like a typo; a name leaves this table when its feature lands."""
from __future__ import annotations

from typing import Optional

FLOAT_FORMATS = "the floating-point formats (FP8, MXFP8, MXFP4) work"
KV_ATTENTION = "the attention and KV-cache quantization work"
VLM = "the vision-language model work"
DIFFUSION = "the diffusion transformer work"
ROTATIONS = "the low-bit activation (W4A4 with rotations) work"

NOT_YET: dict[str, dict[str, str]] = {
    "processor": {
        "online_quarot": DIFFUSION, "adapt_rotation": ROTATIONS, "flatquant": ROTATIONS,
    },
    "dtype": {"hifloat8": FLOAT_FORMATS},
    "saver": {"mindie_format_saver": DIFFUSION},
    "apiversion": {"modelslim_convert": FLOAT_FORMATS},
    # spec.prior: stages run before the main one (the established tool's two-stage adapt_rotation recipe)
    "spec field": {"prior": ROTATIONS},
}


# What a model family needs that this version lacks, as the user reads it in a refusal.
MISSING_PIPELINE = {
    VLM: "vision-language models are not supported yet (issue: VLM pipeline)",
    DIFFUSION: ("this diffusion family is not supported yet (issue: diffusion pipeline; Wan2.1, Wan2.2-T2V-A14B "
                "and Wan2.2-TI2V-5B are)"),
}

# --model_type names of the established tool (protocol.md 5.1) whose families need a pipeline this version lacks:
# {its adapter key there: (the work it belongs to, its names)}. They are refused by name before anything is read,
# so that asking for one says what is missing instead of "unknown model type".
PLANNED_MODEL_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen3_omni_moe": (VLM, ("Qwen3-Omni-30B-A3B-Thinking", "Qwen3-Omni-30B-A3B-Instruct")),
    "qwen2_5_omni_thinker": (VLM, ("Qwen2.5-Omni-7B",)),
    "qwen3_5_moe": (VLM, ("Qwen3.5-397B-A17B", "Qwen3.5-27B", "Qwen3.5-122B-A10B", "Qwen3.5-35B-A3B", "Qwen3.6-27B")),
    "glm4_6v": (VLM, ("GLM-4.6V",)),
    "kimi_k2_5": (VLM, ("Kimi-K2.5",)),
    "kimi_k2_6": (VLM, ("Kimi-K2.6",)),
    "internvl3_5_dense": (VLM, ("InternVL3_5-38B",)),
    "internvl3_5_moe": (VLM, ("InternVL3_5-241B-A28B",)),
    "wan2_2": (DIFFUSION, ("Wan2_2", "Wan2.2")),
    "wan2_2_i2v": (DIFFUSION, ("Wan2.2-I2V-A14B",)),
    "hunyuan_video": (DIFFUSION, ("HunyuanVideo", "hunyuan_video", "hunyuan-video", "hunyuanvideo")),
    "flux1": (DIFFUSION, ("FLUX.1-dev",)),
    "qwen_image_edit": (DIFFUSION, ("Qwen-Image-Edit-2509",)),
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
