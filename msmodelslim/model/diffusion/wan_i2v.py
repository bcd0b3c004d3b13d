"""Wan2.2-I2V-A14B, image-to-video with two experts, as diffusers builds it: a `WanImageToVideoPipeline` folder with
`transformer/` (high-noise expert) and `transformer_2/` (low-noise expert), `boundary_ratio`, and no image encoder
(model_index.json gives image_encoder and image_processor as null: Wan2.2 conditions on the image's VAE latents,
concatenated with a mask to the noisy latents, so each DiT reads 16 + 4 + 16 = 36 input channels). The DiT blocks
and the calibration (each expert on its own timesteps), the layout (save_path/high_noise_model/, low_noise_model/)
and the attention wiring are Wan2.2-T2V-A14B's (wan.py); sampling needs the conditioning image.

`inference_config.image` is that image (the Wan repository's --image): a path, the first frame of every sampled
video; or the `image` of the `spec.dataset` entries (core/sd_dataset.py), one image for all of them.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import field_validator

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model.diffusion.wan import WAN2_2_T2V, WAN_ATTENTION, DiffusionFamily, Expert, WanInferenceConfig


class WanI2VInferenceConfig(WanInferenceConfig):
    """Wan2.2-I2V-A14B's inference_config: Wan2.1's keys plus the conditioning `image`."""

    image: str  # path of the image the video starts from

    @field_validator("image")
    @classmethod
    def _image_file(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"image {value!r} is not a file (the conditioning image: a path to a PNG/JPEG)")
        return str(path.resolve())

    def pipeline_kwargs(self) -> dict[str, Any]:
        """WanImageToVideoPipeline.__call__ arguments: the T2V ones and the image (RGB), resized by the pipeline."""
        from PIL import Image

        with Image.open(self.image) as image:
            return {**super().pipeline_kwargs(), "image": image.convert("RGB")}


@dataclass(frozen=True)
class WanI2VFamily(DiffusionFamily):
    def check_sampling(self, sampling: WanInferenceConfig, model_path: Path) -> None:
        super().check_sampling(sampling, model_path)
        if importlib.util.find_spec("ftfy") is None:  # checked before any weight is read
            raise UnsupportedError("Wan2.2-I2V-A14B sampling needs the ftfy package (diffusers' "
                                   "WanImageToVideoPipeline cleans its prompts with it): pip install ftfy")


WAN2_2_I2V = WanI2VFamily(
    key="wan2_2_i2v",
    names=("Wan2.2-I2V-A14B",),
    pipeline_class="WanImageToVideoPipeline",
    components=WAN2_2_T2V.components,
    experts=(Expert("transformer", "high_noise_model"), Expert("transformer_2", "low_noise_model")),
    description="Wan2.2 image-to-video with two experts",
    tasks=("i2v-A14B",),
    other_tasks="text-to-video is --model_type Wan2.2-T2V-A14B, text-image-to-video --model_type Wan2.2-TI2V-5B",
    attention=WAN_ATTENTION,
    sampling_class=WanI2VInferenceConfig,
)
