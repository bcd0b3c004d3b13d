"""The Omni thinkers: Qwen2.5-Omni-7B (config.json model_type `qwen2_5_omni`, adapter key qwen2_5_omni_thinker) and
Qwen3-Omni-30B-A3B-Thinking / -Instruct (`qwen3_omni_moe`). The thinker is the text model that reads text, images,
video and audio: an audio tower (`audio_tower`), a vision tower (`visual`) and a text decoder (Qwen2 with q/k/v
biases for 2.5; Qwen3-MoE with q/k norms, 128 routed experts and DeepStack features for Qwen3). The speech parts
(`talker.*`, and `token2wav.*` / `code2wav.*`) are not part of the thinker: they are not built, not quantized, and
written through unchanged (FLOAT, model/passthrough.py); vLLM's thinker model skips them.

- Names (= the published checkpoints, = what vLLM reads; transformers' conversion mapping for
  Qwen2_5OmniThinkerForConditionalGeneration strips `thinker.` and moves `model.*` under `model.language_model`):
  `thinker.model.{embed_tokens,layers,norm}`, `thinker.visual.*`, `thinker.audio_tower.*`, `thinker.lm_head`. The
  skeleton is transformers' thinker class under a root module `thinker`, its towers and text children relocated to
  those names (model/skeleton_edits.relocate; the thinker's own forward still finds them). Qwen3-Omni's experts are
  published per expert (`mlp.experts.<e>.{gate,up,down}_proj.weight`) and unfused so here; a checkpoint stacked as
  transformers holds them ([E, 2I, H], [E, H, I]) loads too.
- Pipeline: model/vlm.py's. The vision tower is the first block (run once per sample on the image's and the video's
  patches together), then the text decoder layers one at a time; DeepStack features (Qwen3-Omni) are added after
  their layers as for Qwen3-VL. The audio tower is held whole in memory (read
  with the embeddings; about 0.6B parameters in both published models) and written as read, FLOAT: calibration
  takes no audio, so no rule can be calibrated on it.
- Calibration media: images, videos and text (`calibVideos`, the practices' set, is the project's own: clips of
  numbered PNG frames). A video is a directory of frames (core/vlm_dataset.py), which needs no decoder: the frames
  go to the family's processor as a list of images. transformers builds that processor's video part only with
  torchvision; without it `FrameVideoProcessor` does Qwen2-VL's video preprocessing on the frames through the
  image processor (same resize and normalization, `temporal_patch_size` frames per patch). A video file (.mp4 ...)
  is refused when the set is loaded, before any weight is read, unless a decoder is installed; audio is refused
  by name (an audio decoder is not a dependency either, and the audio tower is not calibrated).
- Algorithms: smoothing (iter_smooth, flex_smooth_quant) and QuaRot on the text decoder, and every quantizer.
  QuaRot rotates the residual stream, and both towers write into it from outside the decoder: the vision merger's
  last linear (and Qwen3-Omni's DeepStack mergers', added after the first layers) and the audio tower's output
  projection (`proj` in Qwen2.5-Omni, `proj2` in Qwen3-Omni: its output is scattered at the audio token positions).
  Their output rows rotate too (`RotationStructure.outside_writers`; the vision ones when the tower's block is
  read, the audio one in prepare_model, the audio tower being held in memory from the start), so the rotated
  thinker is exact in float on every medium; every other tower tensor is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np
import torch
from accelerate import init_empty_weights
from torch import nn

from msmodelslim.core.errors import InvalidModelError, ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.vlm_dataset import VlmCalibSample, video_frames
from msmodelslim.model.hf_config import model_load_errors
from msmodelslim.model.interface import (
    ModelStructure,
    ProcessRequest,
    block_hidden_state,
    dense_mlp_subgraphs,
    gqa_attention_subgraphs,
    moe_mlp_subgraphs,
)
from msmodelslim.model.kv_cache import LLAMA_KV_CACHE, QWEN3_KV_CACHE
from msmodelslim.model.moe import StackedSlice, stacked_source, unfuse_experts
from msmodelslim.model.skeleton_edits import renamed_prefix
from msmodelslim.model.vlm import (
    VlmAdapter,
    VlmFamily,
    VlmLayout,
    _chat_template,
    _load_image,
    _NoImage,
    _processor_class_name,
    published_qwen2_vl_layout,
    vlm_structure,
)
from msmodelslim.model.transformers_model import _to_device

log = get_logger("model.vlm_omni")


@dataclass(frozen=True)
class OmniFamily(VlmFamily):
    """A thinker family: the vision family's data plus the audio tower's linear whose output is scattered into the
    text embeddings at the audio token positions (relative to the audio tower; QuaRot rotates its output rows)."""

    audio_stream_writer: str = "proj"


QWEN2_5_OMNI = OmniFamily("qwen2_5_omni", stream_writers=("merger.mlp.2",), audio_stream_writer="proj")
QWEN3_OMNI_MOE = OmniFamily("qwen3_omni_moe", stream_writers=("merger.mlp.2", "merger_list.*.mlp.2"), moe=True,
                            qk_norm=True, audio_stream_writer="proj2")
PUBLISHED_THINKER = VlmLayout(text="thinker.model", vision="thinker.visual")
AUDIO_TOWER = "thinker.audio_tower"
# transformers' thinker class of each config.json model_type: it loads the published whole-model checkpoint
# (its conversion mapping strips `thinker.` and skips the speech parts); the image-text auto class has no entry
THINKER_CLASSES = {"qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
                   "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration"}
# The special tokens an Omni processor reads off its tokenizer (its constructor fails without them).
PROCESSOR_TOKENS = ("image_token", "video_token", "audio_token", "vision_bos_token", "vision_eos_token",
                    "audio_bos_token", "audio_eos_token")


# Linears the engine fuses, which share one scheme: the text q/k/v and gate/up, and Qwen2.5-Omni's vision attention
# q/k/v (published split, vLLM's vision tower loads them into one qkv)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q", "k", "v"))


def omni_structure(family: OmniFamily) -> ModelStructure:
    """The text decoder's smoothing and rotation (model/vlm.py's, under the thinker's names), with both towers'
    outputs as writers into the rotated residual stream."""
    smooth = gqa_attention_subgraphs() + (moe_mlp_subgraphs() if family.moe else dense_mlp_subgraphs())
    rotation = vlm_structure(family, PUBLISHED_THINKER).rotation
    rotation = replace(rotation, lm_head="thinker.lm_head",
                       outside_writers=rotation.outside_writers + (f"{AUDIO_TOWER}.{family.audio_stream_writer}",))
    return ModelStructure(decoder_layers=PUBLISHED_THINKER.decoder_layers, hf_model_types=(family.hf_model_type,),
                          smooth_subgraphs=smooth, rotation=rotation, fused_groups=FUSED,
                          kv_cache=QWEN3_KV_CACHE if family.qk_norm else LLAMA_KV_CACHE)


class OmniRoot(nn.Module):
    """The root the published names hang from: `thinker` is transformers' thinker (…ThinkerForConditionalGeneration);
    calling the root calls it."""

    def __init__(self, thinker: nn.Module) -> None:
        super().__init__()
        self.thinker = thinker

    @property
    def config(self):
        return self.thinker.config

    def get_input_embeddings(self) -> nn.Module:
        return self.thinker.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.thinker.get_output_embeddings()

    def tie_weights(self) -> None:
        self.thinker.tie_weights()

    def forward(self, *args, **kwargs):
        return self.thinker(*args, **kwargs)


class OmniThinkerAdapter(VlmAdapter):
    """Qwen2.5-Omni-7B's thinker (see the module docstring); Qwen3OmniMoeThinkerAdapter the Qwen3-Omni one."""

    family = QWEN2_5_OMNI
    structure = omni_structure(QWEN2_5_OMNI)
    calibration_media = ("image", "video")  # video as a directory of frames (core/vlm_dataset.py); no audio

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self.structure = omni_structure(self.family)

    def _checkpoint_layout(self) -> VlmLayout:
        names = self.checkpoint.names()
        needed = (PUBLISHED_THINKER.decoder_layers, PUBLISHED_THINKER.vision)
        if not all(any(n.startswith(f"{p}.") for n in names) for p in needed):
            raise InvalidModelError(
                f"{self.model_path}: a published {self.family.hf_model_type} checkpoint holds the thinker at "
                f"thinker.model.layers.* and thinker.visual.*; first names: {sorted(names)[:4]}")
        return PUBLISHED_THINKER

    def thinker_config(self):
        return self.config.thinker_config

    def text_config(self):
        return self.thinker_config().text_config

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.thinker.model.language_model

    def loader_module_name(self, name: str) -> str:
        """The module name transformers gives the layer written as `name` when it loads the thinker class
        (compressed-tensors targets): `thinker.` removed, the text model under `model.language_model`, the
        towers under `model.`."""
        return renamed_prefix(name, {f"{PUBLISHED_THINKER.vision}.": "model.visual.",
                                     f"{AUDIO_TOWER}.": "model.audio_tower.",
                                     f"{PUBLISHED_THINKER.text}.": "model.language_model.",
                                     "thinker.lm_head": "lm_head"})

    def stacked_source(self, name: str) -> StackedSlice | None:
        return stacked_source(name)  # per expert as published; transformers' stacked layout if re-saved by it

    def init_skeleton(self) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        with model_load_errors(self.model_path), init_empty_weights():
            thinker = AutoModelForImageTextToText.from_config(
                self.thinker_config(), trust_remote_code=self.trust_remote_code,
                attn_implementation=self.attn_implementation, dtype=torch.float32)
        model = OmniRoot(thinker).eval()
        if getattr(self.text_config(), "tie_word_embeddings", False):
            model.tie_weights()
        self.prepare_skeleton(model)
        self.enable_kv_cache(model, False)
        return model

    def prepare_skeleton(self, model: nn.Module) -> None:
        published_qwen2_vl_layout(model.thinker, model.thinker.model, towers=("visual", "audio_tower"))
        if self.family.moe:
            unfuse_experts(model)

    def load_weights(self, model: nn.Module, device: torch.device, load_layers: bool,
                     defer_output_head: bool = False) -> nn.Module:
        model = super().load_weights(model, device, load_layers, defer_output_head)
        audio = sum(p.numel() for p in model.get_submodule(AUDIO_TOWER).parameters())
        log.info("audio tower %s (%d parameters) is held whole and written as read (calibration takes no audio)",
                 AUDIO_TOWER, audio)
        return model

    # ---- data --------------------------------------------------------------------------------------------
    def _load_processor(self):
        """The family's processor (its own image/video-token expansion and chat template). transformers builds it
        whole only with torchvision (the video processor) and the audio feature extractor; without them it is built
        from the tokenizer and the image processor, with FrameVideoProcessor for videos given as frames."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(self.model_path, local_files_only=True,
                                                 trust_remote_code=self.trust_remote_code)
        except (ImportError, ValueError, OSError, TypeError, AttributeError) as exc:
            log.warning("the processor of %s cannot be built whole (%s); using its tokenizer and image processor, "
                        "videos as frames through the image processor, no audio", self.model_path,
                        " ".join(str(exc).split())[:160])
            return self._image_only_processor()

    def _image_only_processor(self):
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        class_name = _processor_class_name(self.model_path) or PROCESSOR_MAPPING_NAMES.get(self.config.model_type)
        base = getattr(transformers, class_name or "", None)
        if base is None:
            raise InvalidModelError(f"{self.model_path}: no processor class for model_type "
                                    f"{self.config.model_type!r} in transformers")

        class ImagesOnly(base):
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument is None and argument_name in ("video_processor", "feature_extractor"):
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        kwargs = dict(local_files_only=True, trust_remote_code=self.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(self.model_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"cannot load the tokenizer and image processor from {self.model_path}: "
                                    f"{exc}") from None
        lacking = [n for n in PROCESSOR_TOKENS if getattr(tokenizer, n, None) is None]
        if lacking:
            raise InvalidModelError(f"{self.model_path}: the tokenizer does not name the special tokens "
                                    f"{', '.join(lacking)} that the {class_name} needs (tokenizer_config.json "
                                    f"extra_special_tokens)")
        processor = ImagesOnly(image_processor=image_processor, video_processor=None, feature_extractor=None,
                               tokenizer=tokenizer,
                               chat_template=_chat_template(self.model_path) or tokenizer.chat_template)
        processor.video_processor = FrameVideoProcessor(image_processor)  # after the constructor's class checks
        return processor

    def handle_dataset(self, dataset: Sequence[VlmCalibSample | str], device: torch.device) -> list[dict[str, Any]]:
        """One model input per sample: the chat template over [image, video, text], then the family's processor
        on the rendered prompt with the image and the video's frames (a list of images: no decoder is involved).
        The processor expands the image and video tokens and computes the grids (and, for a video, the seconds per
        temporal patch that M-RoPE's time positions use: the processor's default frame rate)."""
        processor = self.processor
        inputs = []
        for sample in dataset:
            sample = VlmCalibSample(text=sample) if isinstance(sample, str) else sample
            if sample.audio is not None:
                raise UnsupportedError(f"calibration sample with audio {sample.audio}: {self.family.hf_model_type} "
                                       f"calibration takes images, videos (frame directories) and text")
            content: list[dict] = []
            images = [_load_image(Path(sample.image))] if sample.image is not None else None
            videos = None
            if sample.video is not None:  # frames; a file only where its decoder is installed (core/vlm_dataset.py)
                video = Path(sample.video)
                videos = [[_load_image(f) for f in video_frames(video)] if video.is_dir() else str(video)]
            if images:
                content.append({"type": "image"})
            if videos:
                content.append({"type": "video"})
            content.append({"type": "text", "text": sample.text})
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
            encoded = processor(text=[prompt], images=images, videos=videos, return_tensors="pt")
            inputs.append({k: v.to(device) for k, v in encoded.items() if isinstance(v, torch.Tensor)})
        return inputs

    # ---- forward -----------------------------------------------------------------------------------------
    def generate_model_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                               ) -> Generator[ProcessRequest, Any, None]:
        """The vision tower's request, once per sample on the image's and the video's patches together (the tower
        treats each grid separately: one call on both equals two calls), then each text layer's. The tower's output
        (as served: quantized where a rule matched) is split back into the image's and the video's features and
        given to the thinker's own forward as `mm_encoder_outputs`, which scatters them into the text stream,
        computes the M-RoPE positions from the grids and (Qwen3-Omni) the DeepStack features."""
        device = inputs["input_ids"].device
        vision_name = self.layout.vision
        vision = model.get_submodule(vision_name)
        with torch.no_grad():  # now: a layer_wise run drops the table once every sample's first request is out
            token_embeddings = model.get_submodule(f"{self.layout.text}.embed_tokens")(inputs["input_ids"].to("cpu"))
        media = [(kind, pixels, grid) for kind, pixels, grid in VISION_MEDIA if pixels in inputs]
        if media:
            pixels = torch.cat([inputs[p] for _, p, _ in media])
            grid = torch.cat([inputs[g] for _, _, g in media])
            request = ProcessRequest(vision_name, vision, (pixels,), {"grid_thw": grid})
        else:
            request = ProcessRequest(vision_name, _NoImage(), (inputs["input_ids"].new_zeros((0, 1)).float(),))
        output = yield request
        resumed = output if isinstance(output, torch.Tensor) else None  # --resume: see model/vlm.py
        encoder_outputs = None
        if media:
            tower = (self._placeholder_vision_output(vision, {"image_grid_thw": grid}) if resumed is not None
                     else self._served_vision_output(vision, request, output))
            encoder_outputs = _split_by_medium(tower, [(kind, inputs[g]) for kind, _, g in media],
                                               vision.spatial_merge_size)
        hook = model.thinker.model.register_forward_pre_hook(_given_encoder_outputs(encoder_outputs),
                                                             with_kwargs=True)
        try:
            args, kwargs, text_kwargs = self._capture(model, inputs, token_embeddings)
        finally:
            hook.remove()
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        if resumed is not None:
            args = (resumed,) + tuple(args[1:])
        deepstack = text_kwargs.get("deepstack_visual_embeds") or []
        masks = text_kwargs.get("visual_pos_masks")
        text_model = self.language_model(model)
        for index, name in enumerate(self.text_block_names(model)):
            output = yield ProcessRequest(name, model.get_submodule(name), args, kwargs)
            hidden = block_hidden_state(output)
            if resumed is not None and output is resumed:
                args = (hidden,) + tuple(args[1:])
                continue
            if index < len(deepstack):  # DeepStack (Qwen3-Omni): the vision features of tower layer `index`
                if resumed is not None:
                    raise UnsupportedError(
                        f"--resume: the interrupted run stopped before text layer {index} of "
                        f"{self.family.hf_model_type}, which still receives DeepStack features of the vision tower; "
                        f"they are not kept in a checkpoint. Run again without --resume")
                hidden = text_model._deepstack_process(hidden, masks.to(hidden.device),
                                                       deepstack[index].to(hidden.device))
            args = (hidden,) + tuple(args[1:])


# (medium, its pixel input, its grid input), in the order the thinker's forward takes them
VISION_MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def _split_by_medium(tower: Any, grids: list[tuple[str, torch.Tensor]], merge_size: int) -> dict[str, Any]:
    """{medium: the tower's output for that medium's grids}, as the thinker's get_image_features /
    get_video_features return it (pooler_output and DeepStack features split per grid)."""
    if not hasattr(tower, "pooler_output"):
        raise ProcessingError(f"the vision tower's request got {type(tower).__name__} back instead of its output")
    out, start = {}, 0
    for kind, grid in grids:
        sizes = (grid.prod(-1) // merge_size**2).tolist()
        stop = start + sum(sizes)
        fields = {"pooler_output": torch.split(tower.pooler_output[start:stop], sizes)}
        if getattr(tower, "deepstack_features", None) is not None:
            fields["deepstack_features"] = [torch.split(f[start:stop], sizes) for f in tower.deepstack_features]
        out[kind] = type(tower)(**fields)
        start = stop
    return out


def _given_encoder_outputs(encoder_outputs: dict[str, Any] | None):
    """A forward pre-hook for the thinker's model: the tower's outputs given, its pixel inputs removed (the
    thinker then runs no tower; the grids stay for the positions)."""

    def hook(_module, args, kwargs):
        if encoder_outputs is None:
            return args, kwargs
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "pixel_values_videos")}
        return args, {**kwargs, "mm_encoder_outputs": dict(encoder_outputs)}

    return hook


class FrameVideoProcessor:
    """The family's video preprocessing for a video given as frames, without torchvision (transformers' Qwen2-VL
    video processor needs it): every frame goes through the image processor (resize to the same multiple of
    patch x merge, rescale, normalize), the frame count is padded to a multiple of temporal_patch_size by
    repeating the last frame, and each patch holds `temporal_patch_size` consecutive frames, laid out [C, T, p, p]
    (the order of Qwen2-VL's patchify, whose image patches repeat one frame T times: a clip of T identical frames
    equals the image, tests/test_vlm_omni.py)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size
        self.patch_size = image_processor.patch_size

    def __call__(self, videos, return_tensors=None, **_kwargs) -> dict[str, Any]:
        from transformers import BatchFeature

        patches, grids = [], []
        for frames in videos:
            if not isinstance(frames, (list, tuple)):
                raise UnsupportedError(f"video {frames}: without torchvision a video is read as a directory of "
                                       f"numbered frames, not as a file")
            clip, grid = self._clip(list(frames))
            patches.append(clip)
            grids.append(grid)
        return BatchFeature(data={"pixel_values_videos": np.concatenate(patches),
                                  "video_grid_thw": np.array(grids, dtype=np.int64)}, tensor_type=return_tensors)

    def _clip(self, frames: list) -> tuple[np.ndarray, list[int]]:
        t, p = self.temporal_patch_size, self.patch_size
        if not frames:
            raise ProcessingError("a video without frames")
        size = frames[0].size
        if any(f.size != size for f in frames):
            raise ProcessingError(f"the frames of one video must have one size; got {sorted({f.size for f in frames})}")
        frames = frames + [frames[-1]] * (-len(frames) % t)
        per_frame, grid_hw = [], None
        for frame in frames:
            encoded = self.image_processor(images=[frame], return_tensors="np")
            grid_hw = [int(x) for x in encoded["image_grid_thw"][0][1:]]
            values = encoded["pixel_values"]  # [gh*gw, C*T*p*p], the one frame repeated T times
            per_frame.append(values.reshape(values.shape[0], -1, t, p, p)[:, :, 0])  # [gh*gw, C, p, p]
        groups = [np.stack(per_frame[i:i + t], axis=2) for i in range(0, len(per_frame), t)]  # [gh*gw, C, T, p, p]
        clip = np.concatenate([g.reshape(g.shape[0], -1) for g in groups])
        return clip, [len(groups), *grid_hw]


class Qwen3OmniMoeThinkerAdapter(OmniThinkerAdapter):
    """Qwen3-Omni-30B-A3B-Thinking / -Instruct: the Qwen3-Omni-MoE thinker (see the module docstring)."""

    family = QWEN3_OMNI_MOE
    structure = omni_structure(QWEN3_OMNI_MOE)
