"""Tiny random diffusers pipelines of the DiT families on diffusers' pipeline arguments (FLUX.1, Qwen-Image-Edit,
HunyuanVideo), saved as save_pretrained writes them, and what their tests share: the W8A8 dynamic recipe, writing a
multimodal_sd config and running `msmodelslim quant`.

The int8 grid bound (docs/diffusion.md, tests/test_diffusion_wan.py): symmetric int8 with s = max|v|/127 rounds
every element by at most s/2, uniformly, so the relative RMS error of a vector of crest factor k = max|v|/rms(v)
is k/(127*sqrt(12)); a W8A8 dynamic linear rounds both operands independently (sqrt(2)); L quantized linears whose
errors add in quadrature, with no credit for the float residual stream, give sqrt(L)*sqrt(2)*k/(127*sqrt(12)).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from tiny_models import make_tokenizer

W8A8_DYNAMIC = {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
                "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}
CREST_FACTOR = 4.0


def int8_bound(linears: int, crest: float = CREST_FACTOR) -> float:
    return math.sqrt(linears) * math.sqrt(2) * crest / (127 * math.sqrt(12))


def tiny_tokenizer(path: Path, max_length: int | None = None):
    from transformers import PreTrainedTokenizerFast

    if not path.exists():
        make_tokenizer(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None:  # CLIP pads to model_max_length: the tiny text encoder's positions
        tokenizer.model_max_length = max_length
    return tokenizer


def make_tiny_flux(path: Path, seed: int = 0) -> Path:
    """A FluxPipeline folder: 2 dual-stream + 2 single-stream blocks of width 32, CLIP and T5 of width 32."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(path.parent / "tokenizer", max_length=16)
    tokenizer_2 = tiny_tokenizer(path.parent / "tokenizer")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                                  latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                           tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                           transformer=transformer).save_pretrained(path)
    return path


def write_config(path: Path, sampling: dict, process=None, save=None, dump_dir: str = "") -> Path:
    spec = {"process": process if process is not None else [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC}],
            "save": save or [{"type": "ascendv1_saver", "part_file_size": 0}],
            "multimodal_sd_config": {"dump_config": {"dump_data_dir": dump_dir}, "inference_config": sampling}}
    path.write_text(yaml.safe_dump({"apiversion": "multimodal_sd_modelslim_v1", "spec": spec}))
    return path


def quant(model: Path, out: Path, config: Path, model_type: str, *extra: str) -> int:
    from msmodelslim.cli.__main__ import main

    return main(["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu",
                 "--model_type", model_type, "--config_path", str(config), *extra])


def count_pipeline_calls(monkeypatch, pipeline_class: str) -> list:
    """Every sampling run of the diffusers pipeline class (calibration and evaluation): the prompts."""
    import diffusers

    calls: list = []
    cls = getattr(diffusers, pipeline_class)
    original = cls.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    return calls


def make_tiny_qwen_image_edit(path: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """A QwenImageEditPlusPipeline folder: 2 blocks of 2 heads of `head_dim`, a tiny Qwen2.5-VL text encoder (tests/tiny_vlm.py)
    with its processor, the Qwen-Image VAE with factor 2. The processor folder is written as a hub download has it
    (diffusers cannot save a processor without its video processor, which needs torchvision)."""
    import json

    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from tiny_vlm import make_tiny_vlm, write_processor_files

    vlm = make_tiny_vlm(path.parent / f"{path.name}_vlm", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(vlm)
    tokenizer.pad_token = tokenizer.eos_token
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm)
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                           temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=head_dim, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    diffusers.QwenImageEditPlusPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer, processor=None,
                                        transformer=transformer).save_pretrained(path)
    tokenizer.save_pretrained(path / "processor")
    write_processor_files(path / "processor", "qwen2_5_vl")
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def make_picture(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A small picture with structure (a gradient and a disc): the input image of an edit."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    base = (torch.rand(3, generator=generator) * 200).int().tolist()
    picture = Image.new("RGB", size, tuple(base))
    draw = ImageDraw.Draw(picture)
    for x in range(size[0]):
        draw.line([(x, 0), (x, size[1])], fill=(base[0], (x * 8) % 256, 255 - base[2]))
    draw.ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=(240, 240, 40))
    picture.save(path)
    return path


def make_tiny_hunyuan_video(path: Path, seed: int = 0) -> Path:
    """A HunyuanVideoPipeline folder: 2 dual-stream + 2 single-stream blocks of width 32, a Llama and a CLIP of width
    32 (CLIP with the 77 positions the pipeline pads to), the causal 3D VAE with factors 4 (space) and 4 (time)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(path.parent / "tokenizer")
    tokenizer_2 = tiny_tokenizer(path.parent / "tokenizer", max_length=77)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=1024))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer_2), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=32))
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=False)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
    diffusers.HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                   scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                   text_encoder_2=clip, tokenizer_2=tokenizer_2).save_pretrained(path)
    return path


W8A8_STATIC = {"act": {"scope": "per_tensor", "dtype": "int8", "symmetric": False, "method": "minmax"},
               "weight": W8A8_DYNAMIC["weight"]}


@torch.no_grad()
def reference_input_scales(pipe, family, sampling) -> dict[str, float]:
    """{block linear: (max(x, 0) - min(x, 0)) / 255} over every input the linear sees while the float pipeline samples
    the calibration prompts (diffusers' own forward: independent of the layer-wise walk that calibrates)."""
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    denoiser = family.denoiser_of(pipe)
    hooks = []
    for name, block in family.walk(denoiser):
        for child, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                def record(_module, args, key=f"{name}.{child}"):
                    lows[key] = min(lows.get(key, 0.0), float(args[0].min()))
                    highs[key] = max(highs.get(key, 0.0), float(args[0].max()))
                hooks.append(module.register_forward_pre_hook(record))
    try:
        for i, prompt in enumerate(sampling.prompts):
            pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(sampling.base_seed + i),
                 **sampling.pipeline_kwargs())
    finally:
        for hook in hooks:
            hook.remove()
    return {k: (highs[k] - lows[k]) / 255 for k in lows}
