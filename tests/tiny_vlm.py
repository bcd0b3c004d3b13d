"""Tiny randomly initialised vision-language checkpoints (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), saved like a hub
download: safetensors under the published tensor names, config.json, a tokenizer with the chat template and the
vision special tokens, and the image processor's preprocessor_config.json (the PIL image processor: torchvision,
which transformers' video processor needs, is not installed here)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import make_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
# The Qwen-VL chat template, reduced to what calibration uses: a user turn of images and text, the assistant prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                   "qwen3_vl_moe": "Qwen3VLProcessor"}
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def tiny_vlm_config(family: str, vocab_size: int, token_ids: dict[str, int], tie: bool = False, **text_sizes):
    """`text_sizes`: text-model config values that replace the tiny defaults (e.g. moe_intermediate_size=32, one
    MX block, for the recipes' MXFP8 rows)."""
    import transformers as t

    ids = dict(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
               vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])
    text = dict(TEXT, vocab_size=vocab_size, tie_word_embeddings=tie)
    if family == "qwen2_5_vl":  # window attention in block 0, full attention in block 1
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        return t.Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope, **text_sizes},
                                  vision_config={**VISION, "window_size": 16, "fullatt_block_indexes": [1]},
                                  tie_word_embeddings=tie, **ids)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = {**VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
    if family == "qwen3_vl":  # DeepStack: features of vision blocks 0 and 1 added after text layers 0 and 1
        return t.Qwen3VLConfig(text_config={**text, "head_dim": 16, "rope_parameters": rope, **text_sizes},
                               vision_config=vision,
                               tie_word_embeddings=tie, **ids)
    if family == "qwen3_vl_moe":  # every text layer sparse: 4 routed experts, top-2
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
        return t.Qwen3VLMoeConfig(text_config={**text, **moe, "head_dim": 16, "rope_parameters": rope, **text_sizes},
                                  vision_config=vision, tie_word_embeddings=tie, **ids)
    raise ValueError(family)


def write_processor_files(path: Path, family: str) -> None:
    """The image processor's preprocessor_config.json, processor_config.json and chat_template.jinja, as a hub
    download of the family has them (small patches so that a 32x32 image is 16 image tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": PROCESSOR_CLASS[family]}, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_tiny_vlm(path: Path, family: str = "qwen2_5_vl", dtype: torch.dtype = torch.float32, tie: bool = False,
                  seed: int = 0, **text_sizes) -> Path:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = tiny_vlm_config(family, len(tokenizer), token_ids, tie, **text_sizes)
    for c in (config, config.text_config):
        c.bos_token_id = c.eos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init is tiny (std 0.02); widen it so activations and outliers are non-trivial
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-uniform gains: folding them must matter
    model.to(dtype).save_pretrained(path)
    if family == "qwen3_vl_moe":
        _experts_as_published(path)
    write_processor_files(path, family)
    return path


def _experts_as_published(path: Path) -> None:
    """Qwen3-VL-MoE is published with its experts stacked transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]);
    transformers 5 holds (and saves) them as [E, 2I, H] and [E, H, I]."""
    from safetensors.torch import load_file, save_file

    (weights,) = path.glob("*.safetensors")
    state = load_file(weights)
    state = {k: v.transpose(1, 2).contiguous() if k.endswith((".experts.gate_up_proj", ".experts.down_proj")) else v
             for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})


def make_images(directory: Path, count: int = 3, size: tuple[int, int] = (32, 32)) -> list[Path]:
    """A few small PNG images: coloured gradients and blocks (distinct pixel statistics per image)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    paths = []
    for i in range(count):
        w, h = size[0] + 8 * (i % 2), size[1]
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8)
        pixels[: h // 2, :, i % 3] = 255  # a saturated band: an outlier channel
        path = directory / f"image_{i}.png"
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths
