"""Qwen-Image-Edit-2509 (image editing from one to three input images and an instruction), as diffusers builds it:
a `QwenImageEditPlusPipeline` folder (transformer/, vae/ (AutoencoderKLQwenImage), text_encoder/ (Qwen2.5-VL, which
reads the input images and the instruction), tokenizer/, processor/, scheduler/). The denoiser is
`QwenImageTransformer2DModel`, one list of dual-stream blocks `transformer_blocks` (QwenImageTransformerBlock),
called with keywords as block(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
image_rotary_emb, joint_attention_kwargs, modulate_index) and returning (encoder_hidden_states, hidden_states). The
image stream holds the latents being denoised followed by the input images' latents. The text encoder and the VAE
are never quantized.

Linears of a block: attn.to_q/to_k/to_v/to_out.0 (image), attn.add_q_proj/add_k_proj/add_v_proj/to_add_out (text),
img_mlp.net.0.proj/img_mlp.net.2, txt_mlp.net.0.proj/txt_mlp.net.2 and the modulations img_mod.1, txt_mod.1.
Attention module: `attn` (joint attention over both streams).

inference_config: diffusers' QwenImageEditPlusPipeline argument names (protocol.md names none for this family);
`image` is a path or a list of paths. A relative path is looked up from the working directory, then in the
built-in calibration data (msmodelslim/lab_calib/, e.g. calibImages/street.jpg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, computed_field, field_validator

from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.model.diffusion.attention import DitAttentionLayout
from msmodelslim.model.diffusion.dit import (FLOW_SCHEDULERS, TOKENIZERS, DiTFamily, DiTInferenceConfig, config_of,
                                             refuse_off_grid_size)

BUILT_IN_DATA = Path(__file__).resolve().parents[2] / "lab_calib"
DEFAULT_PROMPT = "Change the sky to a warm sunset and add a red kite flying above the street."


def resolve_image(path: str) -> Path:
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    return BUILT_IN_DATA / given


class QwenImageEditInferenceConfig(DiTInferenceConfig):
    """QwenImageEditPlusPipeline.__call__'s arguments (Qwen-Image-Edit-2509's published example: 40 steps,
    true_cfg_scale 4 with the negative prompt " ", the output size from the first image's aspect ratio)."""

    prompt: Union[str, list[str]] = DEFAULT_PROMPT
    image: Optional[Union[str, list[str]]] = None  # the input image(s) every prompt edits (1 to 3)
    negative_prompt: str = " "
    true_cfg_scale: float = Field(4.0, ge=0, le=100)  # > 1 with a negative prompt: two DiT calls a step
    height: Optional[int] = Field(None, ge=16, le=8192)  # None: ~1024*1024 pixels at the first image's ratio
    width: Optional[int] = Field(None, ge=16, le=8192)
    num_inference_steps: int = Field(40, ge=1, le=1000)
    max_sequence_length: int = Field(512, ge=1, le=1024)

    @field_validator("image")
    @classmethod
    def _one_to_three_images(cls, value):
        images = [value] if isinstance(value, str) else value
        if value is not None and not 1 <= len(images) <= 3:
            raise ValueError("give one to three input images (paths)")
        return value

    @property
    def image_paths(self) -> list[Path]:
        images = [self.image] if isinstance(self.image, str) else list(self.image or [])
        return [resolve_image(p) for p in images]

    @computed_field
    @property
    def image_digests(self) -> list[str]:
        """Part of the calibration dump's fingerprint (the settings as dumped): another picture under the same
        path is another sampling, whose dump must not be reused."""
        from msmodelslim.core.sd_calibration import file_digest

        return [file_digest(p) if p.is_file() else "" for p in self.image_paths]

    def pipeline_kwargs(self) -> dict[str, Any]:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in self.image_paths]
        return dict(image=images, negative_prompt=self.negative_prompt or None, true_cfg_scale=self.true_cfg_scale,
                    height=self.height, width=self.width, num_inference_steps=self.num_inference_steps,
                    max_sequence_length=self.max_sequence_length, output_type="latent")

    def check(self, model_path: Path, family: DiTFamily) -> None:
        from PIL import Image, UnidentifiedImageError

        if self.image is None:
            raise ConfigError("inference_config.image is missing: Qwen-Image-Edit samples edits of input images; "
                              "give the path of one to three images (e.g. calibImages/street.jpg, the built-in "
                              "calibration pictures)")
        for path in self.image_paths:
            try:
                with Image.open(path) as picture:
                    picture.verify()
            except (OSError, UnidentifiedImageError) as exc:
                raise ConfigError(f"inference_config.image {path}: not a readable image ({exc})") from None
        if (self.height is None) != (self.width is None):
            raise ConfigError("inference_config: give both height and width, or neither (then the output keeps "
                              "the first image's aspect ratio at about 1024*1024 pixels)")
        if self.height is not None:
            # QwenImageEditPlusPipeline: the VAE factor is 2 ** len(temperal_downsample), latents packed 2x2
            vae_scale = 2 ** len(config_of(model_path, "vae").get("temperal_downsample", [0, 0, 0]))
            refuse_off_grid_size(self.height, self.width, vae_scale * 2, f"VAE factor {vae_scale} x 2x2 packing")


def build_processor(folder: Path):
    """The Qwen2-VL processor of the processor/ folder. Without torchvision transformers cannot build its video
    processor, which image editing never uses: the processor is then built from the tokenizer and the image
    processor alone."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return transformers.Qwen2VLProcessor.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        pass

    class ImageOnlyProcessor(transformers.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{folder}: cannot load the processor's tokenizer and image processor: {exc}") from None
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


QWEN_IMAGE_EDIT = DiTFamily(
    key="qwen_image_edit",
    names=("Qwen-Image-Edit-2509",),
    pipeline_class="QwenImageEditPlusPipeline",
    components={
        "transformer": ("diffusers", ("QwenImageTransformer2DModel",)),
        "vae": ("diffusers", ("AutoencoderKLQwenImage",)),
        "text_encoder": ("transformers", ("Qwen2_5_VLForConditionalGeneration",)),
        "tokenizer": ("transformers", TOKENIZERS),
        "processor": ("transformers", ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")),
        "scheduler": ("diffusers", FLOW_SCHEDULERS),
    },
    blocks="transformer_blocks",
    block_lists=("transformer_blocks",),
    # one joint attention per block (diffusers Attention) over the image and text tokens together: online_quarot and
    # fa3_quant reach its Q/K/V there (model/diffusion/attention.py; the tap hands the processor the keywords
    # diffusers' Attention passes, image_rotary_emb and the masks)
    attention=DitAttentionLayout(modules=("attn",)),
    encoder_first=True,
    row_parallel=("attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2"),
    sampling_class=QwenImageEditInferenceConfig,
    description="Qwen-Image-Edit-2509 image editing",
    component_builders={"processor": build_processor},
    other_pipelines={"QwenImageEditPipeline": "Qwen-Image-Edit (the first release, one input image)",
                     "QwenImagePipeline": "Qwen-Image text-to-image",
                     "QwenImageEditInpaintPipeline": "Qwen-Image-Edit inpainting"},
)
