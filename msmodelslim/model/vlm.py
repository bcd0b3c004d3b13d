"""Vision-language adapters (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE): transformers' image-text-to-text models, with
the vision tower and then the text decoder layers as the blocks of the walk.

- Skeleton: `AutoModelForImageTextToText` on the meta device. Module names are made equal to the checkpoint's
  tensor names, which are also what vLLM reads: Qwen2.5-VL is published with the language model at `model.*` and
  the vision tower at `visual.*` (transformers 5 builds `model.language_model.*` / `model.visual.*` and renames on
  load), so those modules are moved to their published places (model/skeleton_edits.relocate; the model's own
  forward still finds them). Qwen3-VL is published under transformers' own names.
- Blocks: the vision tower is the first block (as the established tool's `generate_model_visit` yields
  `model.visual` first), then the text decoder layers. The processors see it like any block, so a rule that matches
  its linears quantizes them (linear_quant, data-free steps); smoothing subgraphs and rotations describe decoder
  layers only (`ModelStructure.is_decoder_layer`), so it has none. It is read when its turn comes (layer_wise) and
  written when it is finished, float where no rule matched.
- Forward, per sample: the tower runs once on the sample's pixel_values and grid; the model's own forward up to the
  first decoder layer then runs with the tower's output as processed (quantized where a rule matched: what the
  served model feeds its text layers) substituted for the tower, giving the text embeddings with the image
  embeddings scattered in, the M-RoPE position encodings and the mask. The token embeddings are taken before the
  tower's request (a layer_wise run drops the table once every sample's first request is out). DeepStack
  (Qwen3-VL): the language model adds the tower's intermediate features to the image positions after its first
  layers; they come with the same substituted forward and are added after the matching blocks.
- Experts (Qwen3-VL-MoE): published stacked and transposed (`experts.gate_up_proj` [E, H, 2I], `down_proj`
  [E, I, H]); unfused into one nn.Linear per projection and expert, written per expert (formats.md A.5).
- Smoothing and rotation cover the text decoder. QuaRot rotates the residual stream, into which the vision
  merger's output (and DeepStack mergers' outputs) is scattered: those linears' output rows rotate too
  (`RotationStructure.outside_writers`, rotated once the tower's weights are in memory), so the rotated model is
  exact in float on images.

The families and layouts as data, and the structure built from them, are in model/vlm_structure.py; the processor
and the calibration images in model/vlm_processor.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Generator, Mapping, Sequence

import torch
from accelerate import init_empty_weights
from torch import nn

from msmodelslim.core.errors import InvalidModelError, ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.vlm_dataset import VlmCalibSample
from msmodelslim.model.hf_config import model_load_errors
from msmodelslim.model.interface import AttentionShape, ProcessRequest, block_hidden_state
from msmodelslim.model.moe import StackedSlice, stacked_source, unfuse_experts
from msmodelslim.model.passthrough import UnreadTensors, classify_unread
from msmodelslim.model.skeleton_edits import renamed_prefix
from msmodelslim.model.forward_capture import forward_until, to_device
from msmodelslim.model.transformers_model import TransformersModel
from msmodelslim.model.vlm_processor import load_auto_processor, load_image, processor_without
from msmodelslim.model.vlm_structure import (
    PUBLISHED_QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL,
    QWEN3_VL_MOE,
    TRANSFORMERS_5,
    TransposedStackedSlice,
    VlmFamily,
    VlmLayout,
    published_qwen2_vl_layout,
    vlm_structure,
)

log = get_logger("model.vlm")


def projector_fed_inputs(model: nn.Module, first_layer: str, embedding: str, batch: dict[str, torch.Tensor],
                         token_embeddings: torch.Tensor | None, pooler_output: Any) -> tuple[tuple, dict]:
    """The first text layer's inputs from the model's own forward, for models whose forward takes the projector's
    output as `mm_encoder_outputs` (InternVL, Kimi). Given, `token_embeddings` stand for the embedding table's output
    and `pooler_output` for the projector's, in the form the model reads it (the vision blocks are then not run)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    call = {k: v.to("cpu") for k, v in batch.items()}
    if pooler_output is not None:
        call.pop("pixel_values")
        call["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooler_output)}
    substitutes = {}
    if token_embeddings is not None:
        substitutes[model.get_submodule(embedding)] = lambda _ids: token_embeddings
    args, kwargs, _ = forward_until(model, model.get_submodule(first_layer), call, substitutes)
    return args, kwargs


class VlmAdapter(TransformersModel):
    """A Qwen vision-language model (see the module docstring); subclasses name their `family`."""

    is_vlm = True  # app wiring: calibration samples are VlmCalibSample (image + text), not texts
    calibration_media = ("image",)  # checked when the set is loaded (core/vlm_dataset.py), before any weight is read
    family: VlmFamily = QWEN2_5_VL
    structure = vlm_structure(QWEN2_5_VL, PUBLISHED_QWEN2_VL)

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self.layout = self._checkpoint_layout()
        self.structure = vlm_structure(self.family, self.layout)
        self._processor = None

    # ---- names -------------------------------------------------------------------------------------------
    def _checkpoint_layout(self) -> VlmLayout:
        names = self.stored_names()
        for layout in (TRANSFORMERS_5, PUBLISHED_QWEN2_VL):
            if any(n.startswith(f"{layout.decoder_layers}.") for n in names) and \
                    any(n.startswith(f"{layout.vision}.") for n in names):
                return layout
        raise InvalidModelError(
            f"{self.model_path}: the checkpoint has neither the text layers and vision tower of a published "
            f"{self.family.hf_model_type} checkpoint (model.layers.* with visual.*, or model.language_model.layers.* "
            f"with model.visual.*); first names: {sorted(names)[:4]}")

    def loader_module_name(self, name: str) -> str:
        """The module name transformers 5 gives the layer written as `name` (compressed-tensors targets are matched
        against it): a published Qwen2.5-VL layout is renamed on load (`model.layers.*` -> `model.language_model.
        layers.*`, `visual.*` -> `model.visual.*`); vLLM maps both spellings to its own modules."""
        if self.layout != PUBLISHED_QWEN2_VL:
            return name
        return renamed_prefix(name, {f"{PUBLISHED_QWEN2_VL.vision}.": f"{TRANSFORMERS_5.vision}.",
                                     f"{PUBLISHED_QWEN2_VL.text}.": f"{TRANSFORMERS_5.text}."})

    def stacked_source(self, name: str) -> StackedSlice | None:
        source = stacked_source(name)
        if source is None or not self.family.moe:
            return source
        return TransposedStackedSlice(source.tensor, source.index, source.part, hidden=self.text_config().hidden_size)

    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    def attention_shape(self) -> AttentionShape | None:
        c = self.text_config()
        heads = c.num_attention_heads
        return AttentionShape(heads, getattr(c, "num_key_value_heads", None) or heads,
                              getattr(c, "head_dim", None) or c.hidden_size // heads)

    def mla_shape(self):
        return None

    def block_names(self, model: nn.Module) -> list[str]:
        """The vision tower first (it runs before any text layer), then the text decoder layers."""
        return [self.layout.vision] + self.text_block_names(model)

    def text_block_names(self, model: nn.Module) -> list[str]:
        return super().block_names(model)

    def unread_tensors(self, model: nn.Module) -> UnreadTensors:
        names = self.checkpoint.names()  # as the base, with the text layer count (a layer beyond it is an MTP one)
        return classify_unread(self.unused_checkpoint_tensors(model), set(names),
                               {n: self.checkpoint.stored_dtype(n) for n in names}, self.structure.decoder_layers,
                               len(self.text_block_names(model)), str(self.model_path))

    def language_model(self, model: nn.Module) -> nn.Module:
        """transformers' text model (its forward runs the layers; after relocation its children live elsewhere)."""
        return model.model.language_model

    # ---- model -------------------------------------------------------------------------------------------
    def init_skeleton(self) -> nn.Module:
        model, tie_config = self._meta_model()
        model.eval()
        if getattr(tie_config, "tie_word_embeddings", False):
            model.tie_weights()
        self.prepare_skeleton(model)
        self.enable_kv_cache(model, False)
        return model

    def _meta_model(self) -> tuple[nn.Module, Any]:
        """The model built from config.json on the meta device, and the config that says whether its word
        embeddings are tied."""
        return self._meta_image_text_model(self.config), self.config

    def _meta_image_text_model(self, config: Any) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        with model_load_errors(self.model_path), init_empty_weights():
            return AutoModelForImageTextToText.from_config(
                config, trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation,
                dtype=torch.float32)

    def prepare_skeleton(self, model: nn.Module) -> None:
        if self.layout == PUBLISHED_QWEN2_VL:
            published_qwen2_vl_layout(model, model.model)
        if self.family.moe:
            unfuse_experts(model)

    def load_weights(self, model: nn.Module, device: torch.device, load_layers: bool,
                     defer_output_head: bool = False) -> nn.Module:
        model = super().load_weights(model, device, load_layers, defer_output_head)
        vision = model.get_submodule(self.layout.vision)
        parameters = sum(p.numel() for p in vision.parameters())
        log.info("vision tower %s (%d parameters, %.1f MiB in float32) is the first block, then %d text decoder "
                 "layers; %s", self.layout.vision, parameters, parameters * 4 / 2**20,
                 len(self.text_block_names(model)),
                 "all loaded (model_wise)" if load_layers else "each read when its turn comes (layer_wise)")
        return model

    # ---- data --------------------------------------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            self._processor = self._load_processor()
        return self._processor

    def _load_processor(self):
        try:
            return load_auto_processor(self.model_path, self.trust_remote_code)
        except (ImportError, ValueError) as exc:  # the video processor needs torchvision; images do not
            if isinstance(exc, ValueError) and "torchvision" not in str(exc):
                raise InvalidModelError(f"cannot load the processor (tokenizer, image processor, chat template) "
                                        f"from {self.model_path}: {exc}") from None
            log.warning("the processor of %s cannot be built whole (%s); using its tokenizer and image processor "
                        "without the video processor (image calibration only)", self.model_path,
                        " ".join(str(exc).split())[:160])
            return processor_without(self.model_path, self.config.model_type, self.trust_remote_code,
                                     absent=("video_processor",))
        except OSError as exc:
            raise InvalidModelError(f"cannot load the processor (tokenizer, image processor, chat template) from "
                                    f"{self.model_path}: {exc}") from None

    def handle_dataset(self, dataset: Sequence[VlmCalibSample | str], device: torch.device) -> list[dict[str, Any]]:
        """One model input per sample (a plain string is a text-only sample), encoded by `_encode_sample`. Samples
        are not batched (pixel_values of different image sizes do not stack)."""
        processor = self.processor
        inputs = []
        for sample in dataset:
            sample = VlmCalibSample(text=sample) if isinstance(sample, str) else sample
            encoded = self._encode_sample(processor, sample)
            inputs.append({k: v.to(device) for k, v in encoded.items() if isinstance(v, torch.Tensor)})
        return inputs

    def _encode_sample(self, processor, sample: VlmCalibSample) -> Mapping[str, Any]:
        """The chat template over [image, text], tokenized and the image preprocessed by the model's processor."""
        if sample.audio is not None or sample.video is not None:
            kind, path = ("audio", sample.audio) if sample.audio is not None else ("video", sample.video)
            raise UnsupportedError(f"calibration sample with {kind} {path}: {self.family.hf_model_type} "
                                   f"calibration takes images and text only")
        content: list[dict] = []
        if sample.image is not None:
            content.append({"type": "image", "image": load_image(Path(sample.image))})
        content.append({"type": "text", "text": sample.text})
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True, return_tensors="pt")

    # ---- forward -----------------------------------------------------------------------------------------
    def capture_first_block_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        """The first text layer's inputs from the model's own forward (the vision tower run as it is)."""
        args, kwargs, _ = self._capture(model, batch)
        return args, kwargs

    def _capture(self, model: nn.Module, batch: dict[str, torch.Tensor], token_embeddings: torch.Tensor | None = None,
                 vision_output: Any = None) -> tuple[tuple, dict, dict]:
        """The model's own forward (vision tower, scatter, M-RoPE) up to the first text decoder layer: that layer's
        inputs, and what the language model was called with (DeepStack's visual_pos_masks and
        deepstack_visual_embeds). Given, `token_embeddings` stand for the embedding table's output and
        `vision_output` for the tower's (the tower is then not run)."""
        first = model.get_submodule(self.text_block_names(model)[0])
        substitutes = {}
        if token_embeddings is not None:
            substitutes[model.get_submodule(f"{self.layout.text}.embed_tokens")] = lambda _ids: token_embeddings
        if vision_output is not None:  # a fresh copy per call: get_image_features splits its fields in place
            substitutes[model.get_submodule(self.layout.vision)] = lambda *_a, **_k: _copy_output(vision_output)
        args, kwargs, observed = forward_until(model, first, {k: v.to("cpu") for k, v in batch.items()}, substitutes,
                                               {"text": self.language_model(model)})
        return args, kwargs, observed.get("text", {})

    def generate_model_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                               ) -> Generator[ProcessRequest, Any, None]:
        """The vision tower's request (`_tower_inputs`: the sample's pixels and grid; a sample without an image
        sends an empty one that computes nothing), then each text layer's, on the inputs `_text_layer_inputs`
        derives from the tower's output as served."""
        device = inputs["input_ids"].device
        vision_name = self.layout.vision
        vision = model.get_submodule(vision_name)
        with torch.no_grad():  # now: a layer_wise run drops the table once every sample's first request is out
            token_embeddings = model.get_submodule(f"{self.layout.text}.embed_tokens")(inputs["input_ids"].to("cpu"))
        tower_inputs = self._tower_inputs(inputs)
        if tower_inputs is not None:
            pixels, grid = tower_inputs
            request = ProcessRequest(vision_name, vision, (pixels,), {"grid_thw": grid})
        else:
            request = ProcessRequest(vision_name, _NoImage(), (inputs["input_ids"].new_zeros((0, 1)).float(),))
        output = yield request
        # --resume: the runner fast-forwards past the finished blocks by sending a killed run's saved hidden
        # states (the same tensor for every finished block) in place of the blocks' outputs
        resumed = output if isinstance(output, torch.Tensor) else None
        vision_output = None
        if tower_inputs is not None:
            vision_output = (self._placeholder_vision_output(vision, tower_inputs[1]) if resumed is not None
                             else self._served_vision_output(vision, request, output))
        args, kwargs, text_kwargs = self._text_layer_inputs(model, inputs, token_embeddings, vision_output)
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        if resumed is not None:  # the saved input of the next block (the first text layer's when only the tower ran)
            args = (resumed,) + tuple(args[1:])
        deepstack = text_kwargs.get("deepstack_visual_embeds") or []
        masks = text_kwargs.get("visual_pos_masks")
        text_model = self.language_model(model)
        for index, name in enumerate(self.text_block_names(model)):
            output = yield ProcessRequest(name, model.get_submodule(name), args, kwargs)
            hidden = block_hidden_state(output)
            if resumed is not None and output is resumed:  # fast-forward: the saved input holds the features already
                args = (hidden,) + tuple(args[1:])
                continue
            if index < len(deepstack):  # DeepStack: the visual features of vision layer `index` join here
                if resumed is not None:
                    raise UnsupportedError(
                        f"--resume: the interrupted run stopped before text layer {index} of "
                        f"{self.family.hf_model_type}, which still receives DeepStack features of the vision tower "
                        f"(the first {len(deepstack)} layers do); they are not kept in a checkpoint. Run again "
                        f"without --resume")
                hidden = text_model._deepstack_process(hidden, masks.to(hidden.device),
                                                       deepstack[index].to(hidden.device))
            args = (hidden,) + tuple(args[1:])

    def _tower_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The vision tower's (pixels, grid) for this sample; None when it has no image."""
        if "pixel_values" not in inputs:
            return None
        return inputs["pixel_values"], inputs["image_grid_thw"]

    def _text_layer_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor], token_embeddings: torch.Tensor,
                           vision_output: Any) -> tuple[tuple, dict, dict]:
        """The first text layer's inputs and the language model's call (`_capture`), the tower's output as served
        standing for the tower (None: no image)."""
        return self._capture(model, inputs, token_embeddings, vision_output)

    def _served_vision_output(self, vision: nn.Module, request: ProcessRequest, output: Any) -> Any:
        """What the served tower gives the text layers. The runner hands back the output of the block's last
        calibration forward, taken before that step quantized it (right for a text block, whose successor is
        calibrated on float inputs); the text layers are fed the tower's quantized output, so a tower holding
        quantized layers (msmodelslim.ir modules) runs once more, as processed. A float tower's output is used
        as it came (exact)."""
        if not hasattr(output, "pooler_output"):
            raise ProcessingError(f"{self.layout.vision}: the vision tower's request got {type(output).__name__} "
                                  f"back instead of the tower's output")
        if any(type(m).__module__.startswith("msmodelslim.ir") for m in vision.modules()):
            with torch.no_grad():
                return vision(*request.args, **request.kwargs)
        return output

    def _placeholder_vision_output(self, vision: nn.Module, grid: torch.Tensor) -> Any:
        """Zeros shaped as the tower's output, for a resumed run (the tower was finished by the killed run): the
        image embeddings they stand for are in the saved hidden states, and the text layers' other inputs
        (positions, mask) do not depend on them."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tokens = int((grid.prod(-1) // vision.spatial_merge_size**2).sum())
        zeros = torch.zeros(tokens, self.text_config().hidden_size)
        deepstack = getattr(vision, "deepstack_merger_list", None)
        if deepstack is None:
            return BaseModelOutputWithPooling(pooler_output=zeros)
        output_class = getattr(sys.modules[type(vision).__module__], "BaseModelOutputWithDeepstackFeatures")
        return output_class(pooler_output=zeros, deepstack_features=[zeros.clone() for _ in deepstack])


class _NoImage(nn.Module):
    """The vision tower's request of a sample without an image: nothing to run (every sample sends one request
    per block)."""

    def forward(self, *_args, **_kwargs) -> None:
        return None


def _copy_output(output: Any) -> Any:
    """A shallow copy of a transformers ModelOutput (or a tuple)."""
    if isinstance(output, tuple):
        return tuple(output)
    return type(output)(**dict(output.items()))


class Qwen25VlAdapter(VlmAdapter):
    """Qwen2.5-VL-7B/32B/72B-Instruct: window-attention vision tower, PatchMerger into a Qwen2 text decoder
    (q/k/v biases) with M-RoPE."""

    family = QWEN2_5_VL
    structure = vlm_structure(QWEN2_5_VL, PUBLISHED_QWEN2_VL)


class Qwen3VlAdapter(VlmAdapter):
    """Qwen3-VL (dense; also the Embedding/Reranker variants): Qwen3 text decoder (q/k norms), interleaved
    M-RoPE, DeepStack features added after the first text layers."""

    family = QWEN3_VL
    structure = vlm_structure(QWEN3_VL, TRANSFORMERS_5)


class Qwen3VlMoeAdapter(VlmAdapter):
    """Qwen3-VL-30B-A3B / 235B-A22B: Qwen3-VL with routed experts (stacked transposed on disk, unfused here)."""

    family = QWEN3_VL_MOE
    structure = vlm_structure(QWEN3_VL_MOE, TRANSFORMERS_5)
