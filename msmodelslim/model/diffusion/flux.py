"""FLUX.1 text-to-image, as diffusers builds it: a `FluxPipeline` folder (transformer/, vae/, text_encoder/ (CLIP),
tokenizer/, text_encoder_2/ (T5), tokenizer_2/, scheduler/). The denoiser is `FluxTransformer2DModel`: first the
dual-stream `transformer_blocks` (FluxTransformerBlock: separate image and text weights, joint attention), then
the single-stream `single_transformer_blocks` (FluxSingleTransformerBlock: one set of weights over the
concatenated tokens). Both kinds are called as block(hidden_states, encoder_hidden_states, temb,
image_rotary_emb, joint_attention_kwargs) and return (encoder_hidden_states, hidden_states): one walk over both
lists, one block at a time. The text encoders and the VAE are never quantized.

Linears of a dual-stream block: attn.to_q/to_k/to_v/to_out.0 (image), attn.add_q_proj/add_k_proj/add_v_proj/
to_add_out (text), ff.net.0.proj/ff.net.2, ff_context.net.0.proj/ff_context.net.2 and the AdaLN modulations
norm1.linear, norm1_context.linear. Of a single-stream block: attn.to_q/to_k/to_v, proj_mlp, proj_out (attention
and MLP outputs together) and norm.linear. Attention modules (`FluxAttention`): `attn` in both kinds.

inference_config: diffusers' FluxPipeline argument names (protocol.md names none for this family).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from msmodelslim.model.diffusion.attention import DitAttentionLayout
from msmodelslim.model.diffusion.dit import (FLOW_SCHEDULERS, TOKENIZERS, DiTFamily, DiTInferenceConfig, config_of,
                                             refuse_off_grid_size)

DEFAULT_PROMPT = "A cat holding a sign that says hello world, in a sunlit garden."


class FluxInferenceConfig(DiTInferenceConfig):
    """FluxPipeline.__call__'s arguments (FLUX.1-dev's defaults: 1024x1024, 28 steps, embedded guidance 3.5)."""

    prompt: str | list[str] = DEFAULT_PROMPT
    negative_prompt: str = ""  # used only with true_cfg_scale > 1 (then two DiT calls a step)
    true_cfg_scale: float = Field(1.0, ge=0, le=100)
    height: int = Field(1024, ge=16, le=8192)
    width: int = Field(1024, ge=16, le=8192)
    num_inference_steps: int = Field(28, ge=1, le=1000)
    guidance_scale: float = Field(3.5, ge=0, le=100)  # FLUX.1-dev's distilled guidance (a DiT input)
    max_sequence_length: int = Field(512, ge=1, le=512)  # T5 tokens

    def pipeline_kwargs(self) -> dict[str, Any]:
        return dict(negative_prompt=self.negative_prompt or None, true_cfg_scale=self.true_cfg_scale,
                    height=self.height, width=self.width, num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale, max_sequence_length=self.max_sequence_length,
                    output_type="latent")

    def check(self, model_path: Path, family: DiTFamily) -> None:
        # FluxPipeline: latents are 1/vae_scale_factor of the image, packed 2x2 into tokens
        vae_scale = 2 ** (len(config_of(model_path, "vae").get("block_out_channels", [0] * 4)) - 1)
        refuse_off_grid_size(self.height, self.width, vae_scale * 2, f"VAE factor {vae_scale} x 2x2 packing")


FLUX1 = DiTFamily(
    key="flux1",
    names=("FLUX.1-dev",),
    pipeline_class="FluxPipeline",
    components={
        "transformer": ("diffusers", ("FluxTransformer2DModel",)),
        "vae": ("diffusers", ("AutoencoderKL",)),
        "text_encoder": ("transformers", ("CLIPTextModel",)),
        "tokenizer": ("transformers", TOKENIZERS),
        "text_encoder_2": ("transformers", ("T5EncoderModel",)),
        "tokenizer_2": ("transformers", TOKENIZERS),
        "scheduler": ("diffusers", FLOW_SCHEDULERS),
    },
    blocks="transformer_blocks",
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    # one joint attention per block (FluxAttention, both kinds of blocks) over the image and text tokens
    # together: online_quarot and fa3_quant reach its Q/K/V there (model/diffusion/attention.py)
    attention=DitAttentionLayout(modules=("attn",)),
    encoder_first=True,
    row_parallel=("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2", "proj_out"),
    sampling_class=FluxInferenceConfig,
    description="FLUX.1 text-to-image",
    other_pipelines={"FluxImg2ImgPipeline": "FLUX.1 image-to-image", "FluxInpaintPipeline": "FLUX.1 inpainting",
                     "FluxFillPipeline": "FLUX.1 Fill", "FluxKontextPipeline": "FLUX.1 Kontext",
                     "FluxControlPipeline": "FLUX.1 Control"},
)
