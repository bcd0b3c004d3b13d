"""HunyuanVideo text-to-video, as diffusers builds it: a `HunyuanVideoPipeline` folder (transformer/, vae/
(AutoencoderKLHunyuanVideo), text_encoder/ (Llama), tokenizer/, text_encoder_2/ (CLIP), tokenizer_2/, scheduler/).
The denoiser is `HunyuanVideoTransformer3DModel`: first the dual-stream `transformer_blocks`
(HunyuanVideoTransformerBlock), then the single-stream `single_transformer_blocks`
(HunyuanVideoSingleTransformerBlock). Both kinds are called positionally as block(hidden_states,
encoder_hidden_states, temb, attention_mask, image_rotary_emb, token_replace_emb, first_frame_num_tokens) and
return (hidden_states, encoder_hidden_states): one walk over both lists, one block at a time. The text-token
refiner (context_embedder) runs before the blocks and stays float, like the text encoders and the VAE.

Linears of a dual-stream block: attn.to_q/to_k/to_v/to_out.0 (video), attn.add_q_proj/add_k_proj/add_v_proj/
to_add_out (text), ff.net.0.proj/ff.net.2, ff_context.net.0.proj/ff_context.net.2 and the modulations
norm1.linear, norm1_context.linear. Of a single-stream block: attn.to_q/to_k/to_v, proj_mlp, proj_out and
norm.linear. Attention modules: `attn` in both kinds.

inference_config: diffusers' HunyuanVideoPipeline argument names (protocol.md names none for this family).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import Field

from msmodelslim.core.errors import ConfigError
from msmodelslim.model.diffusion.attention import DitAttentionLayout
from msmodelslim.model.diffusion.dit import (FLOW_SCHEDULERS, TOKENIZERS, DiTFamily, DiTInferenceConfig, config_of,
                                             refuse_off_grid_size)

DEFAULT_PROMPT = "A cat walks on the grass, realistic style."


class HunyuanVideoInferenceConfig(DiTInferenceConfig):
    """HunyuanVideoPipeline.__call__'s arguments (the published example: 720x1280, 129 frames, 50 steps, embedded
    guidance 6)."""

    prompt: Union[str, list[str]] = DEFAULT_PROMPT
    negative_prompt: str = ""  # used only with true_cfg_scale > 1 (then two DiT calls a step)
    true_cfg_scale: float = Field(1.0, ge=0, le=100)
    height: int = Field(720, ge=16, le=8192)
    width: int = Field(1280, ge=16, le=8192)
    num_frames: int = Field(129, ge=1, le=1001)
    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(6.0, ge=0, le=100)  # the distilled guidance (a DiT input)
    max_sequence_length: int = Field(256, ge=1, le=4096)  # Llama tokens after the prompt template

    def pipeline_kwargs(self) -> dict[str, Any]:
        return dict(negative_prompt=self.negative_prompt or None, true_cfg_scale=self.true_cfg_scale,
                    height=self.height, width=self.width, num_frames=self.num_frames,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    max_sequence_length=self.max_sequence_length, output_type="latent")

    def check(self, model_path: Path, family: DiTFamily) -> None:
        vae = config_of(model_path, "vae")
        transformer = config_of(model_path, "transformer")
        spatial, temporal = int(vae.get("spatial_compression_ratio", 8)), int(vae.get("temporal_compression_ratio", 4))
        patch = int(transformer.get("patch_size", 2))
        refuse_off_grid_size(self.height, self.width, spatial * patch, f"VAE factor {spatial} x patch {patch}")
        if (self.num_frames - 1) % temporal:
            raise ConfigError(f"inference_config.num_frames {self.num_frames} must be {temporal}k+1 for this "
                              f"checkpoint's VAE (it compresses {temporal} frames into one latent frame after the "
                              f"first); the pipeline would round it silently")


HUNYUAN_VIDEO = DiTFamily(
    key="hunyuan_video",
    names=("hunyuan_video", "hunyuan-video", "hunyuanvideo", "HunyuanVideo"),
    pipeline_class="HunyuanVideoPipeline",
    components={
        "transformer": ("diffusers", ("HunyuanVideoTransformer3DModel",)),
        "vae": ("diffusers", ("AutoencoderKLHunyuanVideo",)),
        "text_encoder": ("transformers", ("LlamaModel",)),
        "tokenizer": ("transformers", TOKENIZERS),
        "text_encoder_2": ("transformers", ("CLIPTextModel",)),
        "tokenizer_2": ("transformers", TOKENIZERS),
        "scheduler": ("diffusers", FLOW_SCHEDULERS),
    },
    blocks="transformer_blocks",
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    # one joint attention per block (diffusers Attention, both kinds of blocks) over the image and text tokens
    # together: online_quarot and fa3_quant reach its Q/K/V there (model/diffusion/attention.py; the tap hands the
    # processor the keywords diffusers' Attention passes, image_rotary_emb and the masks)
    attention=DitAttentionLayout(modules=("attn",)),
    encoder_first=False,
    row_parallel=("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2", "proj_out"),
    sampling_class=HunyuanVideoInferenceConfig,
    description="HunyuanVideo text-to-video",
    other_pipelines={"HunyuanVideoImageToVideoPipeline": "HunyuanVideo image-to-video",
                     "HunyuanSkyreelsImageToVideoPipeline": "SkyReels image-to-video",
                     "HunyuanVideoFramepackPipeline": "HunyuanVideo FramePack",
                     "HunyuanVideo15Pipeline": "HunyuanVideo 1.5"},
)
