"""Which diffusion family a `quant` or `eval` run is on: a --model_type name (the Wan2.2 line's name: the model its
folder holds); anything else is refused by name. Reads only small files (model_index.json), before any weight."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.roadmap import planned_model_type
from msmodelslim.core.sd_config import API_VERSION
from msmodelslim.model.diffusion import diffusion_family, supported_names
from msmodelslim.model.diffusion.wan import DiffusionFamily

log = get_logger("app.diffusion")

# The established tool's `wan2_2` adapter names (the whole Wan2.2 line): which model it is comes from the folder
WAN2_2_LINE = ("wan2_2", "wan2.2")
WAN2_2_KEYS = ("wan2_2_t2v", "wan2_2_ti2v", "wan2_2_i2v")


def is_diffusion_model_type(model_type: Optional[str]) -> bool:
    return diffusion_family(model_type) is not None


def wan2_2_family(model_type: str, model_path: Path) -> DiffusionFamily:
    """The Wan2.2 model a folder holds, for the line's name (--model_type Wan2.2): from its model_index.json."""
    from msmodelslim.model.diffusion import family_of_folder

    family = family_of_folder(Path(model_path))
    if family is None or family.key not in WAN2_2_KEYS:
        raise InvalidModelError(f"--model_type {model_type} names the Wan2.2 line; {model_path} is not a Wan2.2 "
                                f"diffusers pipeline folder (its model_index.json must name WanPipeline with two "
                                f"experts or expand_timesteps, or WanImageToVideoPipeline). Give --model_type "
                                f"Wan2.2-T2V-A14B, Wan2.2-TI2V-5B or Wan2.2-I2V-A14B with its folder")
    log.info("--model_type %s: model_index.json names %s, run as %s", model_type, family.pipeline_class,
             family.names[-1])
    return family


def family_for(model_type: str, model_path: Optional[Path] = None) -> DiffusionFamily:
    """The family of a --model_type name (the Wan2.2 line's name: the one `model_path` holds); refused by name
    otherwise, and when diffusers is not installed."""
    line = model_path is not None and isinstance(model_type, str) and model_type.lower() in WAN2_2_LINE
    family = wan2_2_family(model_type, model_path) if line else diffusion_family(model_type)
    if family is None:
        planned = planned_model_type(model_type)
        raise (UnsupportedError(planned) if planned else
               ConfigError(f"--model_type {model_type!r} is not a diffusion model: {API_VERSION} quantizes the "
                           f"DiT of a diffusion pipeline (supported: {supported_names()}); a "
                           f"language model takes modelslim_v1"))
    if importlib.util.find_spec("diffusers") is None:
        raise UnsupportedError(f"--model_type {model_type} needs the diffusers library, which is not installed: "
                               f"pip install 'msmodelslim[diffusion]' (diffusers>=0.35)")
    return family
