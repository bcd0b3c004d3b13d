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
- Pipeline: model/vlm.py's forward generator, this adapter giving the tower its inputs and the text layers theirs.
  The vision tower is the first block (run once per sample on the image's and the video's patches together), then
  the text decoder layers one at a time; DeepStack features (Qwen3-Omni) are added after their layers as for
  Qwen3-VL. The audio tower is held whole in memory (read with the embeddings; about 0.6B parameters in both
  published models) and written as read, FLOAT: calibration takes no audio, so no rule can be calibrated on it.
- Calibration media: images, videos and text (`calibVideos`, the practices' set, is the project's own: clips of
  numbered PNG frames). A video is a directory of frames (core/vlm_dataset.py), which needs no decoder: the frames
  go to the family's processor as a list of images. transformers builds that processor's video part only with
  torchvision; without it `FrameVideoProcessor` (model/frame_video_processor.py) does Qwen2-VL's video
  preprocessing on the frames through the image processor (same resize and normalization, `temporal_patch_size`
  frames per patch). A video file (.mp4 ...)
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
from typing import Any, Mapping

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError, ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.vlm_dataset import VlmCalibSample, video_frames
from msmodelslim.model.frame_video_processor import FrameVideoProcessor
from msmodelslim.model.interface import ModelStructure, dense_mlp_subgraphs, gqa_attention_subgraphs, moe_mlp_subgraphs
from msmodelslim.model.kv_cache import LLAMA_KV_CACHE, QWEN3_KV_CACHE
from msmodelslim.model.moe import StackedSlice, stacked_source, unfuse_experts
from msmodelslim.model.skeleton_edits import renamed_prefix
from msmodelslim.model.vlm import VlmAdapter
from msmodelslim.model.vlm_processor import load_auto_processor, load_image, processor_without
from msmodelslim.model.vlm_structure import VlmFamily, VlmLayout, published_qwen2_vl_layout, vlm_structure

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
        names = self.stored_names()
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

    def _meta_model(self) -> tuple[nn.Module, Any]:
        """transformers' thinker class under OmniRoot (the published names hang from `thinker`); the text config
        says whether the word embeddings are tied."""
        return OmniRoot(self._meta_image_text_model(self.thinker_config())), self.text_config()

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
        try:
            return load_auto_processor(self.model_path, self.trust_remote_code)
        except (ImportError, ValueError, OSError, TypeError, AttributeError) as exc:
            log.warning("the processor of %s cannot be built whole (%s); using its tokenizer and image processor, "
                        "videos as frames through the image processor, no audio", self.model_path,
                        " ".join(str(exc).split())[:160])
            processor = processor_without(self.model_path, self.config.model_type, self.trust_remote_code,
                                          absent=("video_processor", "feature_extractor"),
                                          required_tokens=PROCESSOR_TOKENS, config_settings=False)
            # set after the constructor's class checks
            processor.video_processor = FrameVideoProcessor(processor.image_processor)
            return processor

    def _encode_sample(self, processor, sample: VlmCalibSample) -> Mapping[str, Any]:
        """The chat template over [image, video, text], then the family's processor on the rendered prompt with the
        image and the video's frames (a list of images: no decoder is involved). The processor expands the image
        and video tokens and computes the grids (and, for a video, the seconds per temporal patch that M-RoPE's
        time positions use: the processor's default frame rate)."""
        if sample.audio is not None:
            raise UnsupportedError(f"calibration sample with audio {sample.audio}: {self.family.hf_model_type} "
                                   f"calibration takes images, videos (frame directories) and text")
        content: list[dict] = []
        images = [load_image(Path(sample.image))] if sample.image is not None else None
        videos = None
        if sample.video is not None:  # frames; a file only where its decoder is installed (core/vlm_dataset.py)
            video = Path(sample.video)
            videos = [[load_image(f) for f in video_frames(video)] if video.is_dir() else str(video)]
        if images:
            content.append({"type": "image"})
        if videos:
            content.append({"type": "video"})
        content.append({"type": "text", "text": sample.text})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        return processor(text=[prompt], images=images, videos=videos, return_tensors="pt")

    # ---- forward (model/vlm.py's generator; these give the tower its inputs and the text layers theirs) -------
    def _tower_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The image's and the video's patches together, one tower request per sample (the tower treats each grid
        separately: one call on both equals two calls)."""
        media = _media_in(inputs)
        if not media:
            return None
        return torch.cat([inputs[p] for _, p, _ in media]), torch.cat([inputs[g] for _, _, g in media])

    def _text_layer_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor], token_embeddings: torch.Tensor,
                           vision_output: Any) -> tuple[tuple, dict, dict]:
        """The tower's output (as served: quantized where a rule matched) split back into the image's and the
        video's features and given to the thinker's own forward as `mm_encoder_outputs`, which scatters them into
        the text stream, computes the M-RoPE positions from the grids and (Qwen3-Omni) the DeepStack features."""
        encoder_outputs = None
        if vision_output is not None:
            merge_size = model.get_submodule(self.layout.vision).spatial_merge_size
            encoder_outputs = _split_by_medium(vision_output, [(kind, inputs[g]) for kind, _, g in _media_in(inputs)],
                                               merge_size)
        hook = model.thinker.model.register_forward_pre_hook(_given_encoder_outputs(encoder_outputs),
                                                             with_kwargs=True)
        try:
            return self._capture(model, inputs, token_embeddings)
        finally:
            hook.remove()


# (medium, its pixel input, its grid input), in the order the thinker's forward takes them
VISION_MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def _media_in(inputs: dict[str, torch.Tensor]) -> list[tuple[str, str, str]]:
    """The VISION_MEDIA entries whose pixels this sample holds."""
    return [(kind, pixels, grid) for kind, pixels, grid in VISION_MEDIA if pixels in inputs]


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


class Qwen3OmniMoeThinkerAdapter(OmniThinkerAdapter):
    """Qwen3-Omni-30B-A3B-Thinking / -Instruct: the Qwen3-Omni-MoE thinker (see the module docstring)."""

    family = QWEN3_OMNI_MOE
    structure = omni_structure(QWEN3_OMNI_MOE)
