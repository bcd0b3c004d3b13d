"""Tiny randomly initialised vision-language checkpoints (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 dense and
MoE), saved like a hub download: safetensors under the published tensor names, config.json, a tokenizer with the
chat template and the vision special tokens, and the image processor's preprocessor_config.json (the PIL image
processor: torchvision, which transformers' video processor needs, is not installed here)."""
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
                   "qwen3_vl_moe": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor", "qwen3_5_moe": "Qwen3VLProcessor"}
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
    if family in ("qwen3_5", "qwen3_5_moe"):  # Gated-DeltaNet layers 0 and 2, full (gated) attention 1 and 3
        return _qwen3_5_config(family, text, rope, ids, tie, text_sizes)
    raise ValueError(family)


ZERO_CENTRED_NORMS = ("layernorm.weight", "language_model.norm.weight", "q_norm.weight", "k_norm.weight")


def _qwen3_5_config(family: str, text: dict, rope: dict, ids: dict, tie: bool, text_sizes: dict):
    """Qwen3.5 / Qwen3.6: 4 text layers alternating linear and full attention; 25% of each head rotary as
    published (here half of 32); no DeepStack. The MoE has 4 routed experts (top-2) and a gated shared expert."""
    import transformers as t

    hybrid = dict(num_hidden_layers=4, head_dim=32, full_attention_interval=2, linear_conv_kernel_dim=4,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    rope = {**rope, "partial_rotary_factor": 0.5}
    vision = {**VISION, "num_position_embeddings": 16}
    text = {**text, **hybrid, "rope_parameters": rope}
    if family == "qwen3_5":
        return t.Qwen3_5Config(text_config={**text, **text_sizes}, vision_config=vision, tie_word_embeddings=tie,
                               **ids)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    return t.Qwen3_5MoeConfig(text_config={**text, **moe, **text_sizes}, vision_config=vision,
                              tie_word_embeddings=tie, **ids)


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

    if family.startswith("internvl"):
        return make_tiny_internvl(path, family, dtype, seed, **text_sizes)
    if family == "glm4v_moe":
        return make_tiny_glm46v(path, dtype, seed, **text_sizes)
    if family in OMNI_TOKENS:
        return make_tiny_omni(path, family, dtype, seed)
    if family == "kimi_k25":
        return make_tiny_kimi_k25(path, dtype, seed, **text_sizes)
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
        if family in ("qwen3_5", "qwen3_5_moe"):  # zero-centred norms scale by (1 + weight): gains ~1 as elsewhere
            for name, p in model.named_parameters():
                if name.endswith(ZERO_CENTRED_NORMS):
                    p.sub_(1.0)
    model.to(dtype).save_pretrained(path)
    if family == "qwen3_vl_moe":
        _experts_as_published(path)
    if family in ("qwen3_5", "qwen3_5_moe"):
        _add_mtp_layer(path, config.text_config.hidden_size)
    write_processor_files(path, family)
    return path


def _add_mtp_layer(path: Path, hidden: int) -> None:
    """Qwen3.5 is published with a multi-token-prediction module (`mtp.*`) transformers does not build: a few
    tensors of its shape family, bf16 as published, so that the pass-through is exercised."""
    from safetensors.torch import load_file, save_file

    (weights,) = path.glob("*.safetensors")
    state = load_file(weights)
    g = torch.Generator().manual_seed(11)
    for name, shape in (("mtp.fc.weight", (hidden, 2 * hidden)), ("mtp.norm.weight", (hidden,)),
                        ("mtp.pre_fc_norm_embedding.weight", (hidden,)),
                        ("mtp.layers.0.self_attn.o_proj.weight", (hidden, hidden))):
        state[name] = torch.randn(*shape, generator=g).to(torch.bfloat16)
    save_file(state, weights, metadata={"format": "pt"})


def _experts_as_published(path: Path) -> None:
    """Qwen3-VL-MoE is published with its experts stacked transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]);
    transformers 5 holds (and saves) them as [E, 2I, H] and [E, H, I]."""
    from safetensors.torch import load_file, save_file

    (weights,) = path.glob("*.safetensors")
    state = load_file(weights)
    state = {k: v.transpose(1, 2).contiguous() if k.endswith((".experts.gate_up_proj", ".experts.down_proj")) else v
             for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})


PROMPT = "Describe this image in detail."


def image_samples(images: list[Path], prompt: str = PROMPT) -> list:
    """One image+prompt calibration sample per image."""
    from msmodelslim.core.vlm_dataset import VlmCalibSample

    return [VlmCalibSample(prompt, image) for image in images]


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


# ---- InternVL3.5 (transformers' -HF layout): InternViT + MLP projector + Qwen3 / Qwen3-MoE text ----------------
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>")
# a 16x16 image tile: 4x4 patches + CLS; pixel shuffle 0.5 -> 4 image tokens of 4*32 features
INTERNVL_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, norm_type="rms_norm", use_qk_norm=True)


def make_tiny_internvl(path: Path, family: str = "internvl", dtype: torch.dtype = torch.float32, seed: int = 0,
                       **text_sizes) -> Path:
    """`family`: internvl (Qwen3 text, as InternVL3_5-38B) or internvl_moe (Qwen3-MoE text, as 241B-A28B)."""
    import transformers as t
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": [*INTERNVL_TOKENS.values(), "<|im_start|>",
                                                                "<|im_end|>"]})
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"  # the named tokens InternVLProcessor reads off the tokenizer
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "extra_special_tokens": INTERNVL_TOKENS}))
    text = dict(TEXT, model_type="qwen3", vocab_size=len(tokenizer), head_dim=16, tie_word_embeddings=False)
    if family == "internvl_moe":  # every text layer sparse: 4 routed experts, top-2
        text.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    decoder_sparse_step=1)
    config = t.InternVLConfig(vision_config=INTERNVL_VISION, text_config={**text, **text_sizes},
                              image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                              tie_word_embeddings=False)
    config.text_config.bos_token_id = config.text_config.eos_token_id = None
    _save_random(config, path, dtype, seed)
    GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                            "image_seq_length": 4}, indent=2))
    (path / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    return path


def _save_random(config, path: Path, dtype: torch.dtype, seed: int) -> None:
    """The model of `config`, initialised as make_tiny_vlm does (widened so activations are non-trivial), saved."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "lambda" in name:  # InternViT's layer scales
                p.fill_(0.5)
    model.to(dtype).save_pretrained(path)


# ---- GLM-4.6V (glm4v_moe): GLM vision tower + GLM-4.5-Air-like MoE text, M-RoPE over partial rotary dims ------
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
GLM_TOKENS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>",
              "<|end_of_video|>", "<|im_start|>", "<|im_end|>"]
GLM_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", GLM_IMAGE)


def make_tiny_glm46v(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **text_sizes) -> Path:
    """Layer 0 dense (first_k_dense_replace 1), layers 1-2 sparse: 4 routed experts top-2 and a shared expert."""
    import transformers as t
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": GLM_TOKENS})
    tokenizer.chat_template = GLM_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    text = dict(TEXT, vocab_size=len(tokenizer), head_dim=16, rope_parameters=rope, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=128, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=16, in_channels=3)
    config = t.Glm4vMoeConfig(text_config={**text, **text_sizes}, vision_config=vision, tie_word_embeddings=False,
                              **ids)
    config.text_config.bos_token_id = config.text_config.eos_token_id = None
    _save_random(config, path, dtype, seed)
    Glm4vImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Glm4vProcessor"}, indent=2))
    (path / "chat_template.jinja").write_text(GLM_CHAT_TEMPLATE)
    return path


# ---- Qwen2.5-Omni / Qwen3-Omni-MoE: the thinker (audio tower + vision tower + text decoder) under `thinker.*` -----
# config.json is the whole model's (qwen2_5_omni / qwen3_omni_moe); the talker and the vocoder are stood for by a
# few tensors of their published prefixes (the adapter writes them through unchanged, FLOAT).
OMNI_TOKENS = {  # {processor attribute: token} as each family's tokenizer names them
    "qwen2_5_omni": {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                     "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                     "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    "qwen3_omni_moe": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                       "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"},
}
OMNI_PROCESSOR = {"qwen2_5_omni": "Qwen2_5OmniProcessor", "qwen3_omni_moe": "Qwen3OmniMoeProcessor"}
OMNI_SPEECH_PARTS = {"qwen2_5_omni": ("talker", "token2wav"), "qwen3_omni_moe": ("talker", "code2wav")}
OMNI_AUDIO = dict(num_mel_bins=16, encoder_layers=1, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64,
                  output_dim=64, max_source_positions=50, n_window=4)


def omni_chat_template(tokens: dict[str, str]) -> str:
    image = tokens["vision_bos_token"] + tokens["image_token"] + tokens["vision_eos_token"]
    video = tokens["vision_bos_token"] + tokens["video_token"] + tokens["vision_eos_token"]
    return CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                 image + "{% elif c['type'] == 'video' %}" + video)


def make_tiny_omni(path: Path, family: str = "qwen2_5_omni", dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Path:
    """`family`: qwen2_5_omni (Qwen2 text with q/k/v biases, window-attention tower) or qwen3_omni_moe (Qwen3-MoE
    text, 4 experts top-2, every layer sparse; Qwen3-VL-like tower with DeepStack after text layers 0 and 1).
    Saved under the published names: `thinker.model.*`, `thinker.visual.*`, `thinker.audio_tower.*`,
    `thinker.lm_head.*`, experts per expert."""
    import transformers as t
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokens = OMNI_TOKENS[family]
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": [*tokens.values(), "<|im_start|>", "<|im_end|>"]})
    template = omni_chat_template(tokens)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"  # the named tokens the Omni processors read off the tokenizer
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "extra_special_tokens": tokens}))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in tokens.items()}
    text = dict(TEXT, vocab_size=len(tokenizer), tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "qwen2_5_omni":
        thinker = t.Qwen2_5OmniThinkerConfig(
            text_config={**text, "rope_parameters": {**rope, "mrope_section": [2, 3, 3]}},
            vision_config={**VISION, "window_size": 16, "fullatt_block_indexes": [1]}, audio_config=OMNI_AUDIO,
            image_token_index=ids["image_token"], video_token_index=ids["video_token"],
            audio_token_index=ids["audio_token"], audio_start_token_id=ids["audio_bos_token"],
            audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
            vision_end_token_id=ids["vision_eos_token"])
        config = t.Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
    elif family == "qwen3_omni_moe":
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
                   head_dim=16)
        thinker = t.Qwen3OmniMoeThinkerConfig(
            text_config={**text, **moe, "rope_parameters": {**rope, "mrope_section": [4, 2, 2],
                                                            "mrope_interleaved": True}},
            vision_config={**VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]},
            audio_config={**OMNI_AUDIO, "downsample_hidden_size": 8, "n_window_infer": 8, "conv_chunksize": 4},
            image_token_id=ids["image_token"], video_token_id=ids["video_token"], audio_token_id=ids["audio_token"],
            audio_start_token_id=ids["audio_bos_token"], vision_start_token_id=ids["vision_bos_token"])
        config = t.Qwen3OmniMoeConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
    else:
        raise ValueError(family)
    thinker = config.thinker_config
    thinker.text_config.bos_token_id = thinker.text_config.eos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(thinker, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    state = {_omni_published(k): v.to(dtype).contiguous() for k, v in model.state_dict().items()
             if not k.endswith(".experts.gate_up_proj") and not k.endswith(".experts.down_proj")}
    for key, value in model.state_dict().items():  # experts published per expert
        if key.endswith(".experts.gate_up_proj"):
            prefix = _omni_published(key[: -len(".gate_up_proj")])
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                state[f"{prefix}.{e}.gate_proj.weight"] = value[e, :half].to(dtype).contiguous()
                state[f"{prefix}.{e}.up_proj.weight"] = value[e, half:].to(dtype).contiguous()
        elif key.endswith(".experts.down_proj"):
            prefix = _omni_published(key[: -len(".down_proj")])
            for e in range(value.shape[0]):
                state[f"{prefix}.{e}.down_proj.weight"] = value[e].to(dtype).contiguous()
    g = torch.Generator().manual_seed(13)
    talker, vocoder = OMNI_SPEECH_PARTS[family]
    for name, shape in ((f"{talker}.model.layers.0.self_attn.q_proj.weight", (16, 16)),
                        (f"{talker}.model.norm.weight", (16,)), (f"{vocoder}.decoder.proj.weight", (8, 16))):
        state[name] = torch.randn(*shape, generator=g).to(torch.bfloat16)
    state = {k: v for k, v in state.items() if not k.endswith("inv_freq")}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config.dtype = dtype
    config.save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": OMNI_PROCESSOR[family]}, indent=2))
    (path / "chat_template.jinja").write_text(template)
    return path


def float_omni_thinker(path: Path, family: str):
    """transformers' thinker class on a published Omni checkpoint (its conversion mapping renames `thinker.*`)."""
    import transformers

    cls = {"qwen2_5_omni": transformers.Qwen2_5OmniThinkerForConditionalGeneration,
           "qwen3_omni_moe": transformers.Qwen3OmniMoeThinkerForConditionalGeneration}[family]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _omni_published(name: str) -> str:
    """transformers' thinker module name -> the published checkpoint name (what vLLM reads)."""
    for held, published in (("model.language_model.", "thinker.model."), ("model.visual.", "thinker.visual."),
                            ("model.audio_tower.", "thinker.audio_tower."), ("lm_head.", "thinker.lm_head.")):
        if name.startswith(held):
            return published + name[len(held):]
    raise ValueError(name)


# ---- Kimi-K2.5 / Kimi-K2.6 (kimi_k25): MoonViT tower + projector + DeepSeek-V3 text (MLA, shared + routed experts) ---
KIMI_IMAGE = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
KIMI_TOKENS = ["<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>",
               "<|kimi_k25_video_placeholder|>", "<|im_start|>", "<|im_end|>"]
KIMI_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", KIMI_IMAGE)
# 2 MoonViT blocks of 2 heads x 16 (axial 2-D RoPE), 4x4 patches merged 2x2 into one image token
KIMI_VISION = dict(patch_size=4, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, num_attention_heads=2,
                   num_hidden_layers=2, hidden_size=32, intermediate_size=64, merge_kernel_size=[2, 2],
                   rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


def kimi_published_state(state: dict[str, torch.Tensor], vision_heads: int) -> dict[str, torch.Tensor]:
    """transformers 5's Kimi_K25 state dict under the names Moonshot publishes (what vLLM reads): the inverse of
    transformers' conversion mapping for kimi_k25 (its own save_pretrained does not invert it correctly: it writes
    the text layers as `blocks`). Vision attention q/k/v are fused into `wqkv` with the q/k rows of each head
    interleaved per rotary pair ((half, 2) instead of transformers' (2, half))."""
    import re

    def interleave(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0]
        half = rows // vision_heads // 2
        return t.reshape(vision_heads, 2, half, *t.shape[1:]).transpose(1, 2).reshape(rows, *t.shape[1:])

    renames = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
               (r"^model\.mm_projector\.in_proj\.", "mm_projector.proj.0."),
               (r"^model\.mm_projector\.out_proj\.", "mm_projector.proj.2."),
               (r"^model\.mm_projector\.", "mm_projector."),
               (r"^model\.vision_tower\.patch_embed\.pos_emb\.position_embeddings$",
                "vision_tower.patch_embed.pos_emb.weight"),
               (r"^model\.vision_tower\.patch_embed\.", "vision_tower.patch_embed."),
               (r"^model\.vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
               (r"^model\.vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
               (r"^model\.vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
               (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
               (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
               (r"^model\.vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo.")]
    published = {}
    for name, tensor in state.items():
        qkv = re.match(r"^model\.vision_tower\.layers\.(\d+)\.attn\.q_proj\.(weight|bias)$", name)
        if qkv:
            block, kind = qkv.groups()
            parts = [state[f"model.vision_tower.layers.{block}.attn.{p}_proj.{kind}"] for p in "qkv"]
            published[f"vision_tower.encoder.blocks.{block}.wqkv.{kind}"] = torch.cat(
                [interleave(parts[0]), interleave(parts[1]), parts[2]]).contiguous()
            continue
        if re.match(r"^model\.vision_tower\.layers\.\d+\.attn\.[kv]_proj\.", name):
            continue
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # published per expert
            experts = "language_model.model." + name[len("model.language_model."):].rpartition(".")[0]
            for e, matrix in enumerate(tensor):
                if name.endswith("gate_up_proj"):
                    gate, up = matrix.chunk(2)
                    published[f"{experts}.{e}.gate_proj.weight"] = gate.contiguous()
                    published[f"{experts}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    published[f"{experts}.{e}.down_proj.weight"] = matrix.contiguous()
            continue
        for pattern, replacement in renames:
            if re.match(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        published[name] = tensor.contiguous()
    return published


class TinyKimiImageProcessor:
    """Test stand-in for transformers' Kimi_K25ImageProcessor, which is built on torchvision (not installed here):
    the same output (pixel_values [patches, 3, p, p] in row-major patch order, image_grid_thw [[1, h, w]]) from an
    image cropped to whole merge windows instead of resized (navit_resize) and padded. Registered with
    AutoImageProcessor by `register_tiny_kimi_image_processor`; made a BaseImageProcessor there."""


def register_tiny_kimi_image_processor() -> None:
    """Make `TinyKimiImageProcessor` (named by the tiny checkpoint's preprocessor_config.json) loadable by
    AutoImageProcessor / AutoProcessor in this process."""
    global TinyKimiImageProcessor
    import numpy as np
    import transformers as t
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_utils import BaseImageProcessor

    if issubclass(TinyKimiImageProcessor, BaseImageProcessor):
        return

    class TinyKimiImageProcessor_(BaseImageProcessor):  # noqa: N801 - renamed below
        model_input_names = ["pixel_values", "image_grid_thw"]

        def __init__(self, patch_size: int = 4, merge_size: int = 2, image_mean=(0.5, 0.5, 0.5),
                     image_std=(0.5, 0.5, 0.5), **kwargs):
            super().__init__(**kwargs)
            self.patch_size, self.merge_size = patch_size, merge_size
            self.image_mean, self.image_std = list(image_mean), list(image_std)

        def preprocess(self, images, return_tensors=None, **_kwargs):
            def flat(items):
                return [i for item in items for i in flat(item)] if isinstance(items, (list, tuple)) else [items]

            images = flat(images)
            window = self.patch_size * self.merge_size
            patches, grids = [], []
            for image in images:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
                h, w = pixels.shape[0] // window * window, pixels.shape[1] // window * window
                pixels = (pixels[:h, :w] - torch.tensor(self.image_mean)) / torch.tensor(self.image_std)
                p = self.patch_size
                grid = pixels.permute(2, 0, 1).reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
                patches.append(grid.reshape(-1, 3, p, p))
                grids.append([1, h // p, w // p])
            return BatchFeature({"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids)},
                                tensor_type=return_tensors)

    TinyKimiImageProcessor_.__name__ = TinyKimiImageProcessor_.__qualname__ = "TinyKimiImageProcessor"
    TinyKimiImageProcessor = TinyKimiImageProcessor_
    class TinyKimiImageConfig(t.PreTrainedConfig):  # a key of its own: Kimi_K25Config's entry names torchvision's
        model_type = "tiny_kimi_image"

    t.AutoImageProcessor.register(TinyKimiImageConfig, image_processor_classes={"pil": TinyKimiImageProcessor},
                                  exist_ok=True)


def make_tiny_kimi_k25(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **text_sizes) -> Path:
    """Kimi-K2.5/K2.6 as Moonshot publishes them (config.json model_type kimi_k25, names `vision_tower.*`,
    `mm_projector.*`, `language_model.model.*`, `language_model.lm_head`), DeepSeek-V3's tiny text decoder (MLA;
    layer 0 dense, layers 1-2 a shared and 4 routed experts, top-2). A 48x40 image is 12x10 patches, 30 tokens."""
    import transformers as t
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from tiny_models import tiny_config

    register_tiny_kimi_image_processor()
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": KIMI_TOKENS})
    tokenizer.chat_template = KIMI_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|media_pad|>"), ("video_token_id", "<|kimi_k25_video_placeholder|>"),
        ("vision_start_token_id", "<|media_begin|>"), ("vision_end_token_id", "<|media_end|>"))}
    text = {**tiny_config("deepseek_v3", len(tokenizer), **text_sizes).to_dict(), "tie_word_embeddings": False,
            "bos_token_id": None, "eos_token_id": None}
    config = t.Kimi_K25Config(text_config=text, vision_config=KIMI_VISION, projection_hidden_size=32,
                              tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # widened as in _save_random
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_file(kimi_published_state(state, KIMI_VISION["num_attention_heads"]), path / "model.safetensors",
              metadata={"format": "pt"})
    config.dtype = dtype
    config.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "TinyKimiImageProcessor", "patch_size": 4, "merge_size": 2}, indent=2))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Kimi_K25Processor"}, indent=2))
    (path / "chat_template.jinja").write_text(KIMI_CHAT_TEMPLATE)
    return path
