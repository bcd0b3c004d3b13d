"""The InternVL3.5 adapter (InternVL3_5-38B: Qwen3 text decoder; InternVL3_5-241B-A28B: Qwen3-MoE text decoder):
transformers' `InternVLForConditionalGeneration`, checkpoints in the transformers-native ("-HF") layout.

- Names: the -HF checkpoints (and transformers' save_pretrained) write `vision_tower.*` (InternViT),
  `multi_modal_projector.*` (LayerNorm, linear_1, GELU, linear_2), `language_model.model.*` and
  `language_model.lm_head`; transformers 5 builds them under `model.*` / `lm_head` and renames on load, so those
  modules are moved to their published places (model/skeleton_edits.relocate; the model's own forward still
  finds them) and the module names are the checkpoint's. No M-RoPE: the text layers take plain 1-D positions.
- The custom-code layout (config.json model_type `internvl_chat`, `InternVLChatModel`: `vision_model.*`, `mlp1.*`,
  `language_model.model.*`) is refused before anything is read: it is built by the checkpoint's own Python code
  (trust_remote_code), and mapping it onto transformers' modules is more than a rename (its vision attention holds
  q/k/v fused in one `attn.qkv` linear and its projector is an unnamed nn.Sequential), so the written checkpoint
  would not be the layout its engine reads either. The -HF conversion of the same weights is supported.
- Blocks: the vision tower, then the projector, then the text decoder layers. Between the two vision blocks the
  model's own glue runs (drop the CLS token, pixel shuffle by `downsample_ratio`), so each block's linears are
  quantized where a rule matches them (upstream's recipes exclude the vision MLPs; excluding the projector,
  `*multi_modal_projector*`, keeps it float) and the text layers see what the served model feeds them: each
  vision block's output as processed.
- Forward, per sample: the tower's request (pixel_values: one row per image tile), the projector's request (the
  shuffled features), then the model's own forward up to the first text layer with the projector's output given
  as the image features (`mm_encoder_outputs`): the token embeddings with the image rows scattered in.
- QuaRot rotates the residual stream; the projector's linear_2 writes into it (its output rows are scattered into
  the embeddings): `RotationStructure.outside_writers`, rotated when the projector block is read, so the rotated
  model is exact in float on images.
- Experts (InternVL3_5-241B-A28B): Qwen3-MoE's, one nn.Linear per projection and expert, written per expert.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Generator

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.model.interface import ModelStructure, ProcessRequest, block_hidden_state
from msmodelslim.model.moe import StackedSlice, stacked_source, unfuse_experts
from msmodelslim.model.skeleton_edits import relocate, renamed_prefix
from msmodelslim.model.forward_capture import to_device
from msmodelslim.model.vlm import VlmAdapter, _NoImage, projector_fed_inputs
from msmodelslim.model.vlm_structure import VlmFamily, VlmLayout, vlm_structure

INTERNVL_HF = VlmLayout(text="language_model.model", vision="vision_tower")  # as the -HF checkpoints are published
PROJECTOR = "multi_modal_projector"
LM_HEAD = "language_model.lm_head"
# {published prefix: transformers 5's module prefix} (loader_module_name)
LOADED_NAMES = {"vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
                "language_model.model.": "model.language_model.", "language_model.lm_head": "lm_head"}
PROJECTOR_STREAM_WRITER = f"{PROJECTOR}.linear_2"  # its output rows are the image rows of the residual stream
# The custom-code layout's top-level names (OpenGVLab's InternVLChatModel), told apart before anything is read.
CUSTOM_CODE_PREFIXES = ("vision_model.", "mlp1.")

INTERNVL_DENSE = VlmFamily("internvl", stream_writers=(), qk_norm=True)  # Qwen3 text decoder: q/k norms
INTERNVL_MOE = replace(INTERNVL_DENSE, moe=True)  # Qwen3-MoE text decoder


def internvl_structure(family: VlmFamily) -> ModelStructure:
    structure = vlm_structure(family, INTERNVL_HF)
    return replace(structure, rotation=replace(structure.rotation, lm_head=LM_HEAD,
                                               outside_writers=(PROJECTOR_STREAM_WRITER,)))


def served_output(block: nn.Module, request: ProcessRequest, output: Any) -> Any:
    """What a vision block gives the served model: the runner hands back its last calibration forward's output,
    taken before quantization; a block holding quantized layers (msmodelslim.ir modules) runs once more, as
    processed. A float block's output is used as it came (exact)."""
    if any(type(m).__module__.startswith("msmodelslim.ir") for m in block.modules()):
        with torch.no_grad():
            return block(*request.args, **request.kwargs)
    return output


class InternVl35Adapter(VlmAdapter):
    """InternVL3_5-38B (Qwen3 text decoder, q/k norms) and InternVL3_5-241B-A28B (Qwen3-MoE text decoder, experts
    unfused): one adapter for both names (upstream's internvl3_5_dense and internvl3_5_moe keys), the text decoder
    read from config.json's text_config, so that a checkpoint of either rebuilds by its model_type alone."""

    family = INTERNVL_DENSE
    structure = internvl_structure(INTERNVL_DENSE)
    TEXT_FAMILIES = {"qwen3": INTERNVL_DENSE, "qwen3_moe": INTERNVL_MOE}

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        text_type = getattr(self.text_config(), "model_type", None)
        if text_type not in self.TEXT_FAMILIES:
            raise UnsupportedError(f"{self.model_path}: an InternVL checkpoint whose text decoder is {text_type!r}; "
                                   f"InternVL3.5's Qwen3 and Qwen3-MoE text decoders are supported "
                                   f"({', '.join(self.TEXT_FAMILIES)})")
        self.family = self.TEXT_FAMILIES[text_type]
        self.structure = internvl_structure(self.family)
        layer, strategy = self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        if layer != -1 or strategy not in ("default", "full"):
            raise UnsupportedError(f"{self.model_path}: vision_feature_layer {layer!r} / vision_feature_select_"
                                   f"strategy {strategy!r}: only the last vision layer's features (-1, 'default' "
                                   f"or 'full', as InternVL3.5 is published) are supported")

    def read_config(self) -> Any:
        """Refuses the custom-code layout by config.json (plain JSON) before transformers sees it."""
        try:
            raw = json.loads((Path(self.model_path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict) and (raw.get("model_type") == "internvl_chat"
                                      or "InternVLChatModel" in (raw.get("architectures") or [])):
            raise UnsupportedError(_custom_code_refusal(self.model_path))
        return super().read_config()

    def _checkpoint_layout(self) -> VlmLayout:
        names = self.stored_names()
        if any(n.startswith(CUSTOM_CODE_PREFIXES) for n in names):
            raise UnsupportedError(_custom_code_refusal(self.model_path))
        for prefix in (f"{INTERNVL_HF.decoder_layers}.", f"{INTERNVL_HF.vision}.", f"{PROJECTOR}."):
            if not any(n.startswith(prefix) for n in names):
                raise InvalidModelError(f"{self.model_path}: the checkpoint has no {prefix}* tensors; an InternVL3.5 "
                                        f"-HF checkpoint has vision_tower.*, multi_modal_projector.* and "
                                        f"language_model.model.layers.*; first names: {sorted(names)[:4]}")
        return INTERNVL_HF

    def loader_module_name(self, name: str) -> str:
        """The module name transformers 5 gives the layer written as `name` (it renames the -HF names on load)."""
        return renamed_prefix(name, LOADED_NAMES)

    def prepare_skeleton(self, model: nn.Module) -> None:
        """Vision tower and projector to the top, the text model and the head under a `language_model` module (the
        published names); the model's own attributes keep reading them."""
        inner = model.model
        relocate(inner, "vision_tower", model, "vision_tower")
        relocate(inner, "multi_modal_projector", model, "multi_modal_projector")
        text = nn.Module()
        relocate(inner, "language_model", text, "model")
        relocate(model, "lm_head", text, "lm_head")
        model._modules["language_model"] = text  # beside the class's `language_model` property, which still works
        inner.__class__ = _dtype_of_tower(type(inner))  # it holds no parameter of its own any more
        if self.family.moe:
            unfuse_experts(model)

    def stacked_source(self, name: str) -> StackedSlice | None:
        return stacked_source(name)  # transformers' stacked layout, if a re-saved checkpoint holds one

    def block_names(self, model: nn.Module) -> list[str]:
        """The vision tower, the projector (the model's glue runs between them), then the text layers."""
        return [INTERNVL_HF.vision, PROJECTOR] + self.text_block_names(model)

    # ---- forward -----------------------------------------------------------------------------------------
    def capture_first_block_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        with torch.no_grad():
            return self._text_inputs(model, batch, None, None)

    def _projector_inputs(self, model: nn.Module, tower_output: Any) -> torch.Tensor:
        """The model's glue between tower and projector (InternVLModel.get_image_features): the CLS token dropped,
        the patch grid pixel-shuffled by downsample_ratio."""
        features = tower_output.last_hidden_state
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:, :]
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1)
        features = model.model.pixel_shuffle(features, scale_factor=self.config.downsample_ratio)
        return features.reshape(features.shape[0], -1, features.shape[-1])

    def _text_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], token_embeddings: torch.Tensor | None,
                     image_embeddings: torch.Tensor | None) -> tuple[tuple, dict]:
        """The first text layer's inputs; given, the embedding table's and the projector's outputs stand in."""
        pooler = None if image_embeddings is None else image_embeddings
        return projector_fed_inputs(model, self.text_block_names(model)[0], f"{INTERNVL_HF.text}.embed_tokens", batch,
                                    token_embeddings, pooler)

    def generate_model_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                               ) -> Generator[ProcessRequest, Any, None]:
        """The tower's request (the sample's image tiles; a sample without an image sends an empty one), the
        projector's (the shuffled features), then each text layer's."""
        device = inputs["input_ids"].device
        tower, projector = model.get_submodule(INTERNVL_HF.vision), model.get_submodule(PROJECTOR)
        with torch.no_grad():  # now: a layer_wise run drops the table once every sample's first request is out
            token_embeddings = model.get_submodule(f"{INTERNVL_HF.text}.embed_tokens")(inputs["input_ids"].to("cpu"))
        has_image = "pixel_values" in inputs
        nothing = (inputs["input_ids"].new_zeros((0, 1)).float(),)
        request = ProcessRequest(INTERNVL_HF.vision, tower, (inputs["pixel_values"],)) if has_image else \
            ProcessRequest(INTERNVL_HF.vision, _NoImage(), nothing)
        output = yield request
        # --resume: the runner fast-forwards past the finished blocks by sending a killed run's saved hidden
        # states (the same tensor for every finished block) in place of the blocks' outputs
        resumed = output if isinstance(output, torch.Tensor) else None
        if has_image and resumed is None:
            with torch.no_grad():
                features = self._projector_inputs(model, served_output(tower, request, output))
            request = ProcessRequest(PROJECTOR, projector, (features,))
        else:
            request = ProcessRequest(PROJECTOR, _NoImage(), nothing)
        output = yield request
        image_embeddings = None
        if resumed is not None:
            if output is not resumed:
                raise UnsupportedError("--resume: the interrupted run stopped between InternVL's vision tower and "
                                       "its projector, whose inputs are not kept in a checkpoint. Run again "
                                       "without --resume")
            if has_image:  # the saved hidden states hold the image rows already; positions and mask do not
                rows = inputs["pixel_values"].shape[0]  # depend on them
                image_embeddings = torch.zeros(rows, self.config.image_seq_length, self.text_config().hidden_size)
        elif has_image:
            image_embeddings = served_output(projector, request, output)
        with torch.no_grad():
            args, kwargs = self._text_inputs(model, inputs, token_embeddings, image_embeddings)
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        if resumed is not None:  # the saved input of the next block: the first text layer's, or passed on below
            args = (resumed,) + tuple(args[1:])
        for name in self.text_block_names(model):
            output = yield ProcessRequest(name, model.get_submodule(name), args, kwargs)
            args = (block_hidden_state(output),) + tuple(args[1:])


@lru_cache(maxsize=None)
def _dtype_of_tower(cls: type) -> type:
    """`cls` (InternVLModel) whose `dtype` (read by get_image_features) is its relocated vision tower's."""
    return type(cls.__name__, (cls,), {"dtype": property(lambda self: self.vision_tower.dtype),
                                       "__module__": cls.__module__})


def _custom_code_refusal(model_path) -> str:
    return (f"{model_path} is an InternVL checkpoint in OpenGVLab's custom-code layout (InternVLChatModel: "
            f"vision_model.*, mlp1.*, language_model.model.*), which only its own Python code builds "
            f"(trust_remote_code) and whose vision attention fuses q/k/v in one linear. Only the transformers-native "
            f"layout is supported (InternVLForConditionalGeneration: vision_tower.*, "
            f"multi_modal_projector.*, language_model.model.*): use the '-HF' checkpoint of the same model "
            f"(e.g. OpenGVLab/InternVL3_5-38B-HF). Nothing was read")
