"""Diffusion pipeline adapters: a family is a diffusers pipeline class, the denoiser (DiT) inside it, where its
blocks are, and the sampling settings its `inference_config` accepts.

The families of the established tool that have no adapter here yet stay in core/roadmap.PLANNED_MODEL_FAMILIES
and are refused by name there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from msmodelslim.model.diffusion.flux import FLUX1
from msmodelslim.model.diffusion.hunyuan_video import HUNYUAN_VIDEO
from msmodelslim.model.diffusion.qwen_image_edit import QWEN_IMAGE_EDIT
from msmodelslim.model.diffusion.wan import WAN2_1, WAN2_2_T2V, WAN2_2_TI2V, DiffusionFamily, Expert
from msmodelslim.model.diffusion.wan_i2v import WAN2_2_I2V

__all__ = ["WAN2_1", "WAN2_2_T2V", "WAN2_2_TI2V", "WAN2_2_I2V", "FLUX1", "QWEN_IMAGE_EDIT", "HUNYUAN_VIDEO",
           "DiffusionFamily", "Expert", "diffusion_family",
           "family_of_folder", "supported_names"]

DIFFUSION_FAMILIES: dict[str, DiffusionFamily] = {f.key: f for f in (WAN2_1, WAN2_2_T2V, WAN2_2_TI2V, WAN2_2_I2V, FLUX1,
                                                                       QWEN_IMAGE_EDIT, HUNYUAN_VIDEO)}
DIFFUSION_MODEL_TYPES: dict[str, DiffusionFamily] = {  # {lowercased --model_type name: family}
    name.lower(): family for family in DIFFUSION_FAMILIES.values() for name in family.names
}


def supported_names() -> str:
    """The --model_type names a refusal lists: each family's last (its canonical) name."""
    return ", ".join(f.names[-1] for f in DIFFUSION_FAMILIES.values())


def diffusion_family(model_type: object) -> Optional[DiffusionFamily]:
    """The family a --model_type name (any case) belongs to, None for a name that is not a diffusion model's."""
    return DIFFUSION_MODEL_TYPES.get(model_type.lower()) if isinstance(model_type, str) else None


def family_of_folder(model_path: Path) -> Optional[DiffusionFamily]:
    """The family whose pipeline model_index.json describes (its class and its number of denoisers: WanPipeline is
    Wan2.1 with one, Wan2.2-T2V-A14B with two), None when there is none or it is unreadable."""
    try:
        index = json.loads((Path(model_path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return next((f for f in DIFFUSION_FAMILIES.values() if f.accepts_index(index)), None)
