"""Names of the established protocol that this version does not implement yet, each with the piece of work it
belongs to. One table, so that every refusal of a recipe that needs one of them says "not implemented yet" and
what is missing, instead of looking like a typo; a name leaves this table when its feature lands."""
from __future__ import annotations

from typing import Optional

FLOAT_FORMATS = "the floating-point formats (FP8, MXFP8, MXFP4) work"
KV_ATTENTION = "the attention and KV-cache quantization work"
VLM = "the vision-language model work"
DIFFUSION = "the diffusion transformer work"
SPARSE = "the sparse quantization work"
ROTATIONS = "the low-bit activation (W4A4 with rotations) work"

NOT_YET: dict[str, dict[str, str]] = {
    "processor": {
        "dynamic_cache": KV_ATTENTION, "kv_smooth": KV_ATTENTION, "fa3_quant": KV_ATTENTION,
        "online_quarot": DIFFUSION, "adapt_rotation": ROTATIONS, "flatquant": ROTATIONS, "svd_res": ROTATIONS,
        "float_sparse": SPARSE,
    },
    "dtype": {"mxfp8": FLOAT_FORMATS, "mxfp4": FLOAT_FORMATS, "fp8_e4m3": FLOAT_FORMATS, "hifloat8": FLOAT_FORMATS},
    "scope": {"per_block": FLOAT_FORMATS, "dual_scale": FLOAT_FORMATS, "per_head": KV_ATTENTION},
    "method": {"ceil_x": FLOAT_FORMATS, "fouroversix": FLOAT_FORMATS, "dualscale": FLOAT_FORMATS,
               "mse_round": FLOAT_FORMATS},
    "saver": {"mindie_format_saver": DIFFUSION},
    "apiversion": {"modelslim_v0": "the modelslim_v0 recipe translation work", "multimodal_vlm_modelslim_v1": VLM,
                   "multimodal_sd_modelslim_v1": DIFFUSION, "modelslim_convert": FLOAT_FORMATS},
}


def not_yet(kind: str, name: object) -> Optional[str]:
    """'<kind> <name> is not implemented yet (it belongs to ...)' for a planned name, else None."""
    work = NOT_YET.get(kind, {}).get(name) if isinstance(name, str) else None
    return f"{kind} {name!r} is not implemented yet (it belongs to {work})" if work else None
