"""The Kimi-K2.5 / Kimi-K2.6 adapter (config.json model_type `kimi_k25`): a MoonViT vision tower (patch embedding
with a learned, bicubically resampled position grid; ViT blocks with axial 2-D RoPE; 2x2 patch merge), a projector
(LayerNorm, linear, GELU, linear) and Kimi-K2's text decoder, which is DeepSeek-V3's (MLA, the first layers dense,
then a shared expert and routed experts), built by transformers' `Kimi_K25ForConditionalGeneration`.

- Names: the module tree is made equal to the names Moonshot publishes (= what vLLM reads): `vision_tower.patch_embed.
  {proj, pos_emb.weight}`, `vision_tower.encoder.blocks.<i>.{norm0, wqkv, wo, norm1, mlp.fc0, mlp.fc1}`,
  `vision_tower.encoder.final_layernorm`, `mm_projector.{pre_norm, proj.0, proj.2}`, `language_model.model.*`,
  `language_model.lm_head`. transformers renames these on load, and it splits `wqkv` into q/k/v with the q/k rows of
  each head permuted from interleaved rotary pairs to halves; here the published modules are kept instead
  (`MoonVitBlock` holds `wqkv` and applies the same permutation to its output, an exact re-indexing), so the
  vision tensors are read and written as they are (byte for byte when they stay float, as in every practice).
- Config: config.json is read as data into transformers' Kimi_K25Config (`auto_map` dropped): the checkpoint's own
  Python code never runs for the model. Its text_config (`kimi_k2` or `deepseek_v3`) becomes DeepSeek-V3's config.
  Whether the head is tied is read from the checkpoint (a `language_model.lm_head.weight` tensor: untied), since
  Kimi_K25Config defaults to tied and the published text decoder is not. A quantization_config kept in text_config
  (int4 pack-quantized experts) is lifted to the top level, where the checkpoint reader looks (not exercised here).
- Blocks: the vision tower, then the projector (the tower's merged patches, normed and flattened per 2x2 window),
  then the text layers; each vision block's output is fed on as processed (quantized where a rule matched). The
  model's own forward then scatters the projector's output into the token embeddings (`mm_encoder_outputs`).
- Text decoder: DeepSeek-V3's structure (model/families.DeepseekV3Adapter: MLA smoothing subgraphs and rotation,
  experts unfused into one nn.Linear per projection and expert, written per expert, formats.md A.5) under the
  published prefix. QuaRot: the projector's `proj.2` writes the image rows of the residual stream
  (`outside_writers`).
- Image preprocessing is the checkpoint's processor (transformers' Kimi_K25Processor and Kimi_K25ImageProcessor);
  that image processor is built on torchvision: without it, calibration is refused by name when the processor is
  first built (handle_dataset; the app has no earlier hook for it), never replaced by another preprocessing.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Generator

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.model.checkpoint import read_json
from msmodelslim.model.families import DeepseekV3Adapter
from msmodelslim.model.hf_config import model_load_errors
from msmodelslim.model.interface import MlaShape, ModelStructure, ProcessRequest, block_hidden_state
from msmodelslim.model.moe import StackedSlice, stacked_source, unfuse_experts
from msmodelslim.model.skeleton_edits import relocate, renamed_prefix
from msmodelslim.model.forward_capture import to_device
from msmodelslim.model.vlm import VlmAdapter, _NoImage, projector_fed_inputs
from msmodelslim.model.vlm_internvl import served_output
from msmodelslim.model.vlm_structure import VlmFamily, VlmLayout

KIMI_PUBLISHED = VlmLayout(text="language_model.model", vision="vision_tower")
PROJECTOR = "mm_projector"
LM_HEAD = "language_model.lm_head"
PROJECTOR_STREAM_WRITER = f"{PROJECTOR}.proj.2"  # its output rows are the image rows of the residual stream
KIMI_K25 = VlmFamily("kimi_k25", stream_writers=(), moe=True)
HF_MODEL_TYPE = "kimi_k25"
# {published prefix: transformers 5's module prefix} (loader_module_name; the vision blocks are renamed and their
# q/k/v split on load, so only the text model, the head and the projector map one to one)
LOADED_NAMES = {"language_model.model.": "model.language_model.", "language_model.lm_head": "lm_head",
                f"{PROJECTOR}.proj.0": "model.mm_projector.in_proj",
                f"{PROJECTOR}.proj.2": "model.mm_projector.out_proj",
                f"{PROJECTOR}.": "model.mm_projector."}


def kimi_k25_structure() -> ModelStructure:
    """DeepSeek-V3's text structure under the published prefix; the projector writes into the rotated stream."""
    base = DeepseekV3Adapter.structure
    rotation = replace(base.rotation, embedding=f"{KIMI_PUBLISHED.text}.embed_tokens",
                       final_norm=f"{KIMI_PUBLISHED.text}.norm", lm_head=LM_HEAD,
                       outside_writers=(PROJECTOR_STREAM_WRITER,))
    return replace(base, decoder_layers=KIMI_PUBLISHED.decoder_layers, hf_model_types=(HF_MODEL_TYPE,),
                   rotation=rotation)


class MoonVitMLP(nn.Module):
    """fc1(act(fc0(x))), under the published names."""

    def __init__(self, fc0: nn.Linear, fc1: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.fc0, self.fc1, self.act = fc0, fc1, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.act(self.fc0(x)))


class MoonVitBlock(nn.Module):
    """One MoonViT block under the published names: x + wo(attn(norm0(x))), then + mlp(norm1(x)).

    `wqkv` rows are [q; k; v]; within each head the published q/k rows interleave the rotary pairs (dims 2i, 2i+1
    rotate together), where transformers' rotary (rotate_half) pairs dim i with i + head_dim/2. The output is
    re-indexed to transformers' order (view (half, 2), transpose), which is exact, and then attended as
    transformers' Kimi_K25VisionAttention does (2-D RoPE, bidirectional within each image's cu_seqlens span)."""

    def __init__(self, layer: nn.Module, heads: int) -> None:
        super().__init__()
        attention = layer.attn
        dim = attention.q_proj.in_features
        self.heads, self.head_dim = heads, dim // heads
        self.norm0, self.norm1 = layer.norm1, layer.norm2
        with torch.device(attention.q_proj.weight.device):
            self.wqkv = nn.Linear(dim, 3 * dim, bias=attention.q_proj.bias is not None)
        self.wo = attention.proj
        self.mlp = MoonVitMLP(layer.mlp.fc1, layer.mlp.fc2, layer.mlp.act)
        self._rotary = sys.modules[type(layer).__module__].apply_rotary_pos_emb_vision  # transformers' own

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self._attention(self.norm0(hidden_states), cu_seqlens, position_embeddings)
        return hidden_states + self.mlp(self.norm1(hidden_states))

    def _attention(self, x: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.wqkv(x).view(tokens, 3, self.heads, self.head_dim).unbind(1)
        q, k = (t.unflatten(-1, (self.head_dim // 2, 2)).transpose(-1, -2).flatten(-2) for t in (q, k))
        cos, sin = position_embeddings
        q, k = self._rotary(q[None], k[None], cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v[None]))  # [1, heads, tokens, head_dim]
        spans = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        out = torch.cat([nn.functional.scaled_dot_product_attention(a, b, c, scale=self.head_dim**-0.5)
                         for a, b, c in zip(q.split(spans, 2), k.split(spans, 2), v.split(spans, 2))], dim=2)
        return self.wo(out.transpose(1, 2).reshape(tokens, -1))


class KimiK25Adapter(VlmAdapter):
    """Kimi-K2.5 and Kimi-K2.6 (one loader, upstream's kimi_k2_5 / kimi_k2_6 keys): see the module docstring."""

    family = KIMI_K25
    structure = kimi_k25_structure()

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self.structure = kimi_k25_structure()
        self.config.tie_word_embeddings = f"{LM_HEAD}.weight" not in self.stored_names()

    def read_config(self) -> Any:
        """config.json as data into transformers' Kimi_K25Config (never the checkpoint's own code)."""
        from transformers import Kimi_K25Config

        config_file = self.model_path / "config.json"
        data = {k: v for k, v in read_json(config_file).items() if k != "auto_map"}
        if data.get("model_type") != HF_MODEL_TYPE:
            raise InvalidModelError(f"--model_type {self.model_type} expects a checkpoint of type {HF_MODEL_TYPE}, "
                                    f"but {config_file} says {data.get('model_type')!r}; pick the matching "
                                    f"--model_type")
        text = data.get("text_config")
        if isinstance(text, dict):  # Moonshot's text_config says kimi_k2: DeepSeek-V3's architecture
            data["text_config"] = {k: v for k, v in text.items() if k != "auto_map"}
            if "quantization_config" not in data and "quantization_config" in text:
                # the checkpoint's own quantization (int4 pack-quantized experts) is read off the top level
                # (model/packed_checkpoint.open_checkpoint), wherever config.json keeps it
                data["quantization_config"] = text["quantization_config"]
        with model_load_errors(self.model_path, f"{config_file} is not a Kimi-K2.5 config (fix it)"):
            return Kimi_K25Config.from_dict(data)

    def _checkpoint_layout(self) -> VlmLayout:
        names = self.stored_names()
        for prefix in (f"{KIMI_PUBLISHED.decoder_layers}.", "vision_tower.encoder.blocks.", f"{PROJECTOR}.proj."):
            if not any(n.startswith(prefix) for n in names):
                raise InvalidModelError(f"{self.model_path}: the checkpoint has no {prefix}* tensors; a Kimi-K2.5/"
                                        f"K2.6 checkpoint is published with vision_tower.encoder.blocks.*, "
                                        f"mm_projector.proj.* and language_model.model.layers.* (a checkpoint "
                                        f"re-saved by transformers is not); first names: {sorted(names)[:4]}")
        return KIMI_PUBLISHED

    def loader_module_name(self, name: str) -> str:
        return renamed_prefix(name, LOADED_NAMES)

    def stacked_source(self, name: str) -> StackedSlice | None:
        return stacked_source(name)  # published per expert; transformers' stacked layout if a checkpoint holds one

    def attention_shape(self):
        return None  # MLA: the value heads are kv_b_proj's V rows (mla_shape)

    def mla_shape(self) -> MlaShape | None:
        c = self.text_config()
        return MlaShape(c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(KIMI_PUBLISHED.text)

    # ---- model -------------------------------------------------------------------------------------------
    def prepare_skeleton(self, model: nn.Module) -> None:
        """The published tree (module docstring); the model's own attributes keep reading the moved modules."""
        inner = model.model
        relocate(inner, "vision_tower", model, "vision_tower")
        tower = model.vision_tower
        heads = tower.config.num_attention_heads
        encoder = nn.Module()
        relocate(tower, "layers", encoder, "blocks")
        relocate(tower, "final_layernorm", encoder, "final_layernorm")
        tower.add_module("encoder", encoder)
        blocks = encoder.blocks
        for i, layer in enumerate(list(blocks)):
            blocks[i] = MoonVitBlock(layer, heads)
        pos_emb = tower.patch_embed.pos_emb
        relocate(pos_emb, "position_embeddings", pos_emb, "weight")
        relocate(inner, "mm_projector", model, PROJECTOR)
        projector, proj = model.mm_projector, nn.Module()
        relocate(projector, "in_proj", proj, "0")
        relocate(projector, "out_proj", proj, "2")
        projector.add_module("proj", proj)
        text = nn.Module()
        relocate(inner, "language_model", text, "model")
        relocate(model, "lm_head", text, "lm_head")
        model._modules["language_model"] = text
        unfuse_experts(model)

    def block_names(self, model: nn.Module) -> list[str]:
        return [KIMI_PUBLISHED.vision, PROJECTOR] + self.text_block_names(model)

    # ---- data --------------------------------------------------------------------------------------------
    def _load_processor(self):
        """The checkpoint's processor; transformers' Kimi_K25ImageProcessor is built on torchvision, so without it
        image calibration is refused by name (no other image preprocessing is substituted)."""
        try:
            return super()._load_processor()
        except (InvalidModelError, ImportError) as exc:
            if "torchvision" not in str(exc):
                raise
            raise UnsupportedError(f"{self.model_path}: Kimi-K2.5/K2.6 images are preprocessed by transformers' "
                                   f"Kimi_K25ImageProcessor, which needs torchvision (not installed); install it "
                                   f"(pip install torchvision, the build matching your torch) to calibrate this "
                                   f"model on images") from None

    # ---- forward -----------------------------------------------------------------------------------------
    def capture_first_block_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        with torch.no_grad():
            return self._text_inputs(model, batch, None, None)

    def _token_embeddings(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding table's output as the model's forward asks for it (image/video placeholders read row 0)."""
        ids = input_ids.to("cpu").clone()
        ids[(ids == self.config.image_token_id) | (ids == self.config.video_token_id)] = 0
        return model.get_submodule(f"{KIMI_PUBLISHED.text}.embed_tokens")(ids)

    def _text_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], token_embeddings: torch.Tensor | None,
                     image_embeddings: torch.Tensor | None) -> tuple[tuple, dict]:
        """The first text layer's inputs; given, the embedding table's and the projector's outputs stand in."""
        pooler = None if image_embeddings is None else (image_embeddings,)
        return projector_fed_inputs(model, self.text_block_names(model)[0], f"{KIMI_PUBLISHED.text}.embed_tokens",
                                    batch, token_embeddings, pooler)

    def generate_model_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                               ) -> Generator[ProcessRequest, Any, None]:
        """The tower's request (the sample's patches and grid; a sample without an image sends an empty one), the
        projector's (the tower's merged patches), then each text layer's."""
        device = inputs["input_ids"].device
        tower, projector = model.get_submodule(KIMI_PUBLISHED.vision), model.get_submodule(PROJECTOR)
        with torch.no_grad():  # now: a layer_wise run drops the table once every sample's first request is out
            token_embeddings = self._token_embeddings(model, inputs["input_ids"])
        has_image = "pixel_values" in inputs
        nothing = (inputs["input_ids"].new_zeros((0, 1)).float(),)
        request = ProcessRequest(KIMI_PUBLISHED.vision, tower, (inputs["pixel_values"],),
                                 {"grid_thw": inputs["image_grid_thw"]}) if has_image else \
            ProcessRequest(KIMI_PUBLISHED.vision, _NoImage(), nothing)
        output = yield request
        # --resume: the runner fast-forwards past the finished blocks by sending a killed run's saved hidden
        # states (the same tensor for every finished block) in place of the blocks' outputs
        resumed = output if isinstance(output, torch.Tensor) else None
        if has_image and resumed is None:
            request = ProcessRequest(PROJECTOR, projector, (served_output(tower, request, output).pooler_output,))
        else:
            request = ProcessRequest(PROJECTOR, _NoImage(), nothing)
        output = yield request
        image_embeddings = None
        if resumed is not None:
            if output is not resumed:
                raise UnsupportedError("--resume: the interrupted run stopped between Kimi-K2.5's vision tower and "
                                       "its projector, whose inputs are not kept in a checkpoint. Run again "
                                       "without --resume")
            if has_image:  # the saved hidden states hold the image rows already; positions and mask do not
                rows = int(inputs["image_grid_thw"][:, 1:].prod(-1).sum()) // self._merge_window()
                image_embeddings = torch.zeros(rows, self.text_config().hidden_size)
        elif has_image:
            image_embeddings = served_output(projector, request, output).squeeze(1)
        with torch.no_grad():
            args, kwargs = self._text_inputs(model, inputs, token_embeddings, image_embeddings)
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        if resumed is not None:  # the saved input of the next block: the first text layer's, or passed on below
            args = (resumed,) + tuple(args[1:])
        for name in self.text_block_names(model):
            output = yield ProcessRequest(name, model.get_submodule(name), args, kwargs)
            args = (block_hidden_state(output),) + tuple(args[1:])

    def _merge_window(self) -> int:
        height, width = self.config.vision_config.merge_kernel_size
        return height * width


__all__ = ["KimiK25Adapter", "MoonVitBlock", "kimi_k25_structure"]